"""``benchmarks/startup.py`` fills a database labgate reads as meant, and times real starts.

A start-up figure means something only if the portal really loaded the big
table: this runs the benchmark's steps at a tiny size and checks what the
started portal reported loading, without judging any time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "startup.py"


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("startup_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_filled_database_is_what_the_started_portal_and_router_load(tmp_path: Path) -> None:
    startup = load_benchmark()
    tmp_path.chmod(0o700)
    size = {"users": 30, "instances": 12, "events": 100}
    result = startup.measure(f"sqlite:///{tmp_path}/full.db", tmp_path, size, rounds=1)
    # Every running instance is a route, every user is known.
    assert result["loaded"] == {"routes": 12, "users": 30, "tokens": 0}
    assert len(result["portal_ready_s"]) == 1 and len(result["router_ready_s"]) == 1
    assert all(t > 0 for t in result["portal_ready_s"] + result["router_ready_s"])


def test_a_kept_database_is_used_again_only_at_the_size_it_was_filled_to(tmp_path: Path) -> None:
    startup = load_benchmark()
    url = f"sqlite:///{tmp_path}/full.db"
    size = {"users": 3, "instances": 2, "events": 5}
    assert not startup.filled_before(url, size)
    startup.fill(url, **size)
    assert startup.filled_before(url, size)
    with pytest.raises(RuntimeError, match="holds"):
        startup.filled_before(url, {**size, "events": 6})
