"""A run's results in its owner's workspace: links the owner plants there are never followed.

The owner may make ``runs``, ``runs/<id>`` or any folder below a link (to
another user's workspace, the data dir). Downloading results must not send
what the link points to, and collecting results must not delete or write there.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from runs_helpers import submit, wait_run

ONE = """
[[stages]]
name = "one"
[[stages.tasks]]
name = "t"
command = "echo 1 > $LABGATE_RESULT; echo mine > $LABGATE_RESULTS_DIR/mine.txt"
"""

SLOW = """
[[stages]]
name = "one"
[[stages.tasks]]
name = "notebooks"
command = "sleep 1; echo new > $LABGATE_RESULTS_DIR/planted.txt"
"""


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` (no link followed) and its text."""
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def names(content: bytes) -> list[str]:
    """The member names of a ``.tar.gz``."""
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        return tar.getnames()


async def finished_run(client, headers) -> str:
    """A succeeded run of ``ONE`` (its results collected); its id."""
    run_id = await submit(client, headers, ONE)
    run = await wait_run(client, headers, run_id)
    assert run["state"] == "succeeded", run
    return run_id


async def test_linked_run_folder_is_not_followed_by_results(app, client, make_user):
    ws = app.state.portal.settings.workspaces_dir
    alice = await make_user("alice")
    await make_user("bob")
    (ws / "bob").mkdir(parents=True, exist_ok=True)
    (ws / "bob" / "secret.txt").write_text("bob's secret")
    run_id = await finished_run(client, alice)
    shutil.rmtree(ws / "alice" / "runs" / run_id)
    (ws / "alice" / "runs" / run_id).symlink_to(ws / "bob")

    got = await client.get(f"/api/v1/runs/{run_id}/results", headers=alice)

    assert got.status_code == 200, got.text
    assert names(got.content) == ["results.json"]
    assert b"bob's secret" not in got.content


async def test_linked_runs_folder_is_not_followed_by_results(app, client, make_user):
    ws = app.state.portal.settings.workspaces_dir
    alice = await make_user("alice")
    await make_user("bob")
    run_id = await finished_run(client, alice)
    stash = ws / "bob" / "stash" / run_id
    stash.mkdir(parents=True)
    (stash / "secret.txt").write_text("bob's secret")
    shutil.rmtree(ws / "alice" / "runs")
    (ws / "alice" / "runs").symlink_to(ws / "bob" / "stash")

    got = await client.get(f"/api/v1/runs/{run_id}/results", headers=alice)

    assert got.status_code == 200, got.text
    assert names(got.content) == ["results.json"]
    assert b"bob's secret" not in got.content


async def test_collector_never_deletes_or_writes_through_a_planted_link(
    app, client, make_user, caplog
):
    ws = app.state.portal.settings.workspaces_dir
    alice = await make_user("alice")
    await make_user("bob")
    (ws / "bob" / "notebooks").mkdir(parents=True, exist_ok=True)
    (ws / "bob" / "notebooks" / "work.ipynb").write_text("bob's work")
    before = tree(ws / "bob")
    run_id = await submit(client, alice, SLOW)
    # Planted while the task runs, before its results are collected.
    (ws / "alice" / "runs").mkdir(parents=True, exist_ok=True)
    (ws / "alice" / "runs" / run_id).symlink_to(ws / "bob")

    await wait_run(client, alice, run_id)

    assert tree(ws / "bob") == before  # nothing deleted, replaced or added there
    assert not (ws / "bob" / ".logs").exists()
    assert (ws / "alice" / "runs" / run_id).is_symlink()  # left as the owner made it
    assert "is a link or not a folder: not followed" in caplog.text  # the refusal is logged


async def test_a_linked_log_is_not_read(app, client, make_user):
    """``GET /runs/<id>/logs`` reads a kept log without following links: not another file."""
    ws = app.state.portal.settings.workspaces_dir
    alice = await make_user("alice")
    secrets = ws / "alice-elsewhere"
    (secrets / ".logs").mkdir(parents=True)
    (secrets / ".logs" / "t.log").write_text("not alice's: the data dir, say\n")
    run_id = await finished_run(client, alice)
    logs = ws / "alice" / "runs" / run_id / ".logs"
    shutil.rmtree(logs)
    logs.symlink_to(secrets / ".logs")

    got = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "t"}, headers=alice)

    assert "not alice's" not in got.text


async def test_a_results_download_holds_a_few_pieces_however_large_the_folder(
    app, client, make_user, tmp_path
):
    """The archive is streamed as it is compressed, never built whole in the portal's memory.

    The owner can grow their run's folder (it is in their workspace) without
    bound; a download of it must not take the portal's memory with it.
    """
    import os
    import tracemalloc

    ws = app.state.portal.settings.workspaces_dir
    alice = await make_user("alice")
    run_id = await finished_run(client, alice)
    folder = ws / "alice" / "runs" / run_id
    for i in range(12):  # 96 MiB that gzip cannot shrink
        (folder / f"big{i}.bin").write_bytes(os.urandom(8 << 20))
    saved = tmp_path / "results.tar.gz"
    tracemalloc.start()
    try:
        with saved.open("wb") as out:
            url = f"/api/v1/runs/{run_id}/results"
            async with client.stream("GET", url, headers=alice) as response:
                assert response.status_code == 200
                async for piece in response.aiter_raw():
                    out.write(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert saved.stat().st_size > 96 << 20
    with tarfile.open(saved, mode="r:gz") as tar:
        got = {member.name: member.size for member in tar}
    assert [size for name, size in got.items() if name.endswith("/mine.txt")] == [5], got
    assert all(got[f"big{i}.bin"] == 8 << 20 for i in range(12))
    assert peak < 32 << 20, f"the portal held {peak / 2**20:.0f} MiB for a 96 MiB download"


async def test_a_kept_log_grown_without_line_ends_is_read_from_its_end_only(app, client, make_user):
    """``GET /runs/<id>/logs`` reads at most 4 MiB back from a kept log's end.

    The owner can replace the log in their workspace with gigabytes on one
    line; the portal must neither read it whole nor send it all.
    """
    import tracemalloc

    from labgate.backends.procfs import MAX_TAIL_BYTES

    ws = app.state.portal.settings.workspaces_dir
    alice = await make_user("alice")
    run_id = await finished_run(client, alice)
    log = ws / "alice" / "runs" / run_id / ".logs" / "t.log"
    with log.open("wb") as out:
        for _ in range(16):  # 64 MiB and not one line end
            out.write(b"x" * (4 << 20))
        out.write(b"\nlast line\n")
    tracemalloc.start()
    try:
        url = f"/api/v1/runs/{run_id}/logs"
        got = await client.get(url, params={"task": "t", "lines": 2}, headers=alice)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.status_code == 200
    text = got.json()["text"]
    assert text.endswith("\nlast line\n")
    assert len(text) <= MAX_TAIL_BYTES
    assert peak < 32 << 20, f"the portal held {peak / 2**20:.0f} MiB for a 64 MiB log"


def test_collecting_never_writes_through_a_folder_the_owner_swaps_for_a_link(tmp_path):
    """Results are unpacked member by member through descriptors, as snapshots are restored.

    The owner, from a shell in an instance, replaces a folder the unpacking
    has just made with a link to a folder of root's: the task's own files
    (its content theirs) must never land there.
    """
    import os
    import threading
    import time

    from labgate.scheduler.runresults import unpack

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(1000):
            member = tarfile.TarInfo(f"d/f{i:04}")
            member.size = 4
            tar.addfile(member, io.BytesIO(b"data"))
    archive = buffer.getvalue()
    outside = tmp_path / "roots"
    outside.mkdir()
    deadline = time.monotonic() + 10
    rounds = planted = 0
    while time.monotonic() < deadline and rounds < 300:
        target = tmp_path / f"ws{rounds}" / "runs" / "r1" / "t"
        stop = threading.Event()

        def plant(task: Path = target, stop: threading.Event = stop) -> None:
            """The owner: as soon as ``d`` appears, put a link to ``roots`` in its place."""
            moved = 0
            while not stop.is_set():
                try:
                    os.rename(task / "d", task / f"d.{moved}")
                    moved += 1
                    os.symlink(outside, task / "d")
                    return
                except (FileNotFoundError, FileExistsError, NotADirectoryError):
                    continue

        thread = threading.Thread(target=plant, daemon=True)
        thread.start()
        try:
            unpack(archive, target)
        except (OSError, ValueError, tarfile.TarError):
            pass  # refused: the link was met on the way
        finally:
            stop.set()
            thread.join()
        rounds += 1
        planted += (target / "d").is_symlink()
        assert list(outside.iterdir()) == [], f"written outside in round {rounds}"
    assert planted > 0  # the owner did get a link in (else the race proved nothing)
