"""The installed backends read the catalog's tables (labgate.backends.registry)."""

from __future__ import annotations

from pathlib import Path

from labgate.backends.registry import load_catalog, tool_unavailable_reason


def write(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "tools"
    directory.mkdir(exist_ok=True)
    (directory / "t.toml").write_text('name = "t"\ntitle = "T"\n' + text)
    return directory


def test_a_table_no_backend_reads_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, '[process]\ncommand = ["true"]\n[pbs]\nqueue = "x"\n'))
    tool = catalog.get("t")
    assert tool is not None and tool_unavailable_reason(tool, "process") is None
    assert tool.sections["pbs"] == {"queue": "x"}
    assert [p.reason for p in catalog.problems if p.file.endswith("t.toml")] == [
        "[pbs] is read by no installed backend; ignored"
    ]
    reason = tool_unavailable_reason(tool, "pbs")
    assert reason is not None and reason.startswith("backend 'pbs' is not available")


def test_a_table_failing_its_backends_schema_leaves_the_other_backends(tmp_path: Path) -> None:
    text = '[process]\ncommand = ["{colour}"]\n[container]\nimage = "x"\n'
    catalog = load_catalog(write(tmp_path, text))
    tool = catalog.get("t")
    assert tool is not None
    assert tool_unavailable_reason(tool, "containers") is None
    reason = tool_unavailable_reason(tool, "process")
    assert reason is not None
    assert reason.startswith("[process] Value error, unknown placeholder {colour}")
    assert [p.reason for p in catalog.problems if p.file.endswith("t.toml")] == [
        f"{reason}: cannot run on the process or slurm backend"  # both read [process]
    ]
