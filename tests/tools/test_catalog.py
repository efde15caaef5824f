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
    extensions = (
        '--ServerApp.jpserver_extensions={"labgate.tools.jupyter_busy": True, '
        '"labgate.tools.jupyter_pageconfig": True}'
    )
    assert extensions in command


def test_a_stray_value_is_still_refused(tmp_path: Path) -> None:
    directory = tmp_path / "tools"
    directory.mkdir()
    (directory / "t.toml").write_text('name = "t"\ntitle = "T"\nhelth_path = "/"\n')
    catalog = Catalog.load(directory)
    assert catalog.get("t") is None
    assert any("helth_path: Extra inputs" in p.reason for p in catalog.problems)
