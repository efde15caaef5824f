"""The chaos run, short: ``benchmarks/chaos.py --quick`` against the test PostgreSQL server.

Three portals, two routers and two agents run as real processes while users
launch, use and stop the demo tool and a random one of them is killed with
SIGKILL every 5 s. The test reads the run's figures, not only its exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import needs_postgres

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "chaos.py"


@pytest.mark.slow
@needs_postgres
def test_a_split_labgate_killed_every_few_seconds_loses_and_doubles_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--db-url", os.environ["LABGATE_TEST_DB_URL"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tail = result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines, tail
    figures = json.loads(lines[-1])

    # It really was chaos: processes of every kind died while users worked.
    killed = {kill["process"][0] for kill in figures["kills"]}
    assert len(figures["kills"]) >= 5 and killed >= {"p", "r"}, figures["kills"]
    assert figures["cycles"] >= figures["users"], tail
    assert figures["requests"]["http"]["requests"] > 100
    assert figures["requests"]["ws"]["requests"] > 100

    assert figures["lost"] == {}
    assert figures["duplicated"] == {}
    assert figures["leaked"] == {}
    assert figures["stuck"] == {}
    assert figures["usage_problems"] == {}
    assert figures["unexplained_failures"] == []
    assert figures["not_stopped_at_end"] == 0
    assert figures["leftover_processes"] == 0
    # Users did see kills (their router's): the figure is measured, not zero by default.
    assert figures["longest_interruption_s"] > 0, figures["longest_interruption"]
    assert figures["ok"] is True and result.returncode == 0, tail
