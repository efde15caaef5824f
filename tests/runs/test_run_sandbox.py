"""A task runs in the bubblewrap sandbox: it sees its results directory, not the server's files."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from runs_helpers import submit, tasks_of, wait_run

from labgate.scheduler import runresults
from labgate.scheduler.runresults import unpack

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)"
)


async def test_a_task_sees_neither_the_data_dir_nor_the_workspaces(client, make_user, settings):
    alice = await make_user("alice")
    data_dir = settings.data_dir.resolve()
    (data_dir / "secret.txt").write_text("the server's")
    (data_dir / "workspaces" / "bob").mkdir(parents=True)
    definition = f"""
[[stages]]
name = "one"
[[stages.tasks]]
name = "snoop"
command = '''
test -e {data_dir}/secret.txt && echo SAW-DB
test -e {data_dir}/workspaces/bob && echo SAW-WS
cat {data_dir}/secret.txt
echo looked'''
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded", run
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "snoop"}, headers=alice)
    text = logs.json()["text"]
    assert "looked" in text
    assert "SAW-DB" not in text and "SAW-WS" not in text and "the server's" not in text
    assert tasks_of(run)["snoop"]["exit_code"] == 0


def test_a_results_archive_cannot_write_outside_its_directory(tmp_path: Path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"owned"
        for name in ("../escaped.txt", "/abs.txt"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    target = tmp_path / "results" / "task"
    with pytest.raises(tarfile.TarError):
        unpack(buffer.getvalue(), target)
    assert not (tmp_path / "results" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("shape", ["one-huge-file", "many-files"])
def test_a_results_archive_that_would_fill_the_disk_is_refused_before_anything_is_written(
    tmp_path: Path, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lying site's few compressed bytes that unpack past the limit are not unpacked,
    and the earlier attempt's results stay. (The limits, 1 GiB and 100,000 files, are
    made small here to keep the test quick.)"""
    monkeypatch.setattr(runresults, "MAX_UNPACKED", 4 * 1024 * 1024)
    monkeypatch.setattr(runresults, "MAX_MEMBERS", 500)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if shape == "one-huge-file":
            info = tarfile.TarInfo("zeros")
            info.size = runresults.MAX_UNPACKED + 1
            tar.addfile(info, _Zeros(info.size))
        else:
            for number in range(runresults.MAX_MEMBERS + 1):
                tar.addfile(tarfile.TarInfo(f"f{number}"), io.BytesIO(b""))
    assert len(buffer.getvalue()) < runresults.MAX_UNPACKED // 100
    target = tmp_path / "results" / "task"
    target.mkdir(parents=True)
    (target / "earlier.txt").write_text("kept")
    with pytest.raises(ValueError, match="unpacked"):
        unpack(buffer.getvalue(), target)
    assert [p.name for p in target.iterdir()] == ["earlier.txt"]


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces (a file of zeros without holding it in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count
