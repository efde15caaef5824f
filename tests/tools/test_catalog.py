"""Tool files: placeholders, literal braces, and the built-in catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from labgate.tools.catalog import Catalog, ProcessSpec


def test_doubled_braces_are_literal_and_placeholders_are_filled() -> None:
    spec = ProcessSpec(command=["{python}", '--x={{"a": True}}', "--port={port}"])
    spec.check_placeholders()
    command, _ = spec.render({"python": "/usr/bin/python3", "port": "8123"})
    assert command == ["/usr/bin/python3", '--x={"a": True}', "--port=8123"]


@pytest.mark.parametrize(
    ("part", "fragment"),
    [
        ("{colour}", "unknown placeholder {colour}"),
        ("{port.real}", "unknown placeholder {port.real}"),
        ('{"a": True}', "unknown placeholder"),
        ("--x={", "bad braces"),
        ("--x=}", "bad braces"),
    ],
)
def test_what_format_would_not_fill_is_refused(part: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("{", r"\{").replace(".", r"\.")):
        ProcessSpec(command=[part]).check_placeholders()


def test_the_builtin_jupyterlab_tool_loads_the_busy_reporter() -> None:
    catalog = Catalog.load()
    assert catalog.problems == []
    tool = catalog.get("jupyterlab")
    assert tool is not None
    process = tool.parsed("process", ProcessSpec)
    assert process is not None
    command, _ = process.render(
        {
            "python": "py",
            "port": "1",
            "base_url": "/i/x/",
            "workspace": "/w",
            "instance_id": "x",
            "user": "u",
            "instance_token": "t",
        }
    )
    assert '--ServerApp.jpserver_extensions={"labgate.tools.jupyter_busy": True}' in command


def write(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "tools"
    directory.mkdir(exist_ok=True)
    (directory / "t.toml").write_text('name = "t"\ntitle = "T"\n' + text)
    return directory


def test_a_table_no_backend_reads_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    catalog = Catalog.load(write(tmp_path, '[process]\ncommand = ["true"]\n[slurm]\nqueue = "x"\n'))
    tool = catalog.get("t")
    assert tool is not None and tool.unavailable_reason("process") is None
    assert tool.sections["slurm"] == {"queue": "x"}
    assert [p.reason for p in catalog.problems if p.file.endswith("t.toml")] == [
        "[slurm] is read by no installed backend; ignored"
    ]
    assert tool.unavailable_reason("slurm").startswith("backend 'slurm' is not available")


def test_a_table_failing_its_backends_schema_leaves_the_other_backends(tmp_path: Path) -> None:
    text = '[process]\ncommand = ["{colour}"]\n[container]\nimage = "x"\n'
    catalog = Catalog.load(write(tmp_path, text))
    tool = catalog.get("t")
    assert tool is not None
    assert tool.unavailable_reason("containers") is None
    reason = tool.unavailable_reason("process")
    assert reason is not None
    assert reason.startswith("[process] Value error, unknown placeholder {colour}")
    assert [p.reason for p in catalog.problems if p.file.endswith("t.toml")] == [
        f"{reason}: cannot run on the process backend"
    ]


def test_a_stray_value_is_still_refused(tmp_path: Path) -> None:
    catalog = Catalog.load(write(tmp_path, "helth_path = '/'\n"))
    assert catalog.get("t") is None
    assert any("helth_path: Extra inputs" in p.reason for p in catalog.problems)
