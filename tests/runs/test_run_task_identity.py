"""A task on a process site run as root runs as its owner's per-user uid, capability-free."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from runs_helpers import submit, tasks_of, wait_run
from sqlalchemy import select

from labgate.db.models import User

pytestmark = [
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="only root switches a task to another uid"),
]


async def _user_id(app: Any, name: str) -> int:
    def find(session: Any) -> int:
        return int(session.scalar(select(User.id).where(User.name == name)))

    return int(await app.state.portal.run_db(find))


async def test_a_task_runs_as_its_owners_uid_and_reads_no_root_only_file(
    app, client, make_user, settings
):
    # /etc is shown read-only in the sandbox: the task sees this file, and only root may read it.
    probe = Path("/etc") / f"labgate-test-root-only-{secrets.token_hex(6)}"
    probe.write_text("root-only-secret\n")
    probe.chmod(0o600)
    try:
        alice = await make_user("alice")
        uid = settings.instance_uid_base + await _user_id(app, "alice")
        definition = f"""
[[stages]]
name = "one"
[[stages.tasks]]
name = "who"
command = '''
echo "ID=$(id -u):$(id -g):$(id -G)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status
test -e {probe} && echo PROBE-SEEN
cat {probe} 2>/dev/null && echo READ-ROOT-ONLY
echo "CWD=$(pwd)"
echo mine > out.txt
mkdir -p "$HOME/.cache" && echo cached > "$HOME/.cache/x" && echo HOME-WRITABLE
echo '{{"uid": '$(id -u)'}}' > $LABGATE_RESULT
echo looked'''
"""
        run_id = await submit(client, alice, definition)
        run = await wait_run(client, alice, run_id)
        logs = await client.get(
            f"/api/v1/runs/{run_id}/logs", params={"task": "who"}, headers=alice
        )
        text = logs.json()["text"]
        assert run["state"] == "succeeded", (run, text)
        assert "looked" in text, text
        status = dict(
            line.split(":", 1) for line in text.splitlines() if line.startswith(("Cap", "NoNew"))
        )
        assert f"ID={uid}:{uid}:{uid}" in text, text
        assert uid != 0
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, (cap, text)
        assert status["NoNewPrivs"].strip() == "1", text
        assert "HOME-WRITABLE" in text, text  # caches and dotfiles work as that uid
        assert "PROBE-SEEN" in text, text  # there, but not readable
        assert "READ-ROOT-ONLY" not in text and "root-only-secret" not in text, text
        # It works in its results directory as that uid, and the site still collects them.
        task = tasks_of(run)["who"]
        assert task["result"] == {"uid": uid}
        assert task["files"] == ["out.txt"]
        archive = await client.get(f"/api/v1/runs/{run_id}/results", headers=alice)
        assert archive.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            out = tar.extractfile("who/out.txt")
            assert out is not None and out.read() == b"mine\n"
            summary = tar.extractfile("results.json")
            assert summary is not None
            assert tasks_of(json.loads(summary.read()))["who"]["result"] == {"uid": uid}
    finally:
        probe.unlink(missing_ok=True)
