"""Resolver benchmark: resolve latency and bulk inventory pushes on a big SQLite registry.

::

    .venv/bin/python benchmarks/resolver.py                  # 1,000,000 datasets, ~2-4 minutes
    .venv/bin/python benchmarks/resolver.py --datasets 100000 --push 20000   # ~20 s

What it does, in one fresh data directory (a temporary one unless ``--data-dir``):

1. migrates an empty SQLite database and records four sites (east, west,
   north, south, each with a data root);
2. loads ``--datasets`` datasets with two replicas each (east and west) with
   ``executemany`` in large transactions, the way a bulk import would;
3. resolves ``--resolves`` random identifiers, each in a random spelling
   (``doi:``, ``https://doi.org/…``, upper case…), through
   ``labgate.portal.api.resolve.resolve_dataset``, the function
   ``GET /api/v1/resolve`` runs, one database session per call as the API
   has: p50, p90, p99, max;
4. pushes an inventory of ``--push`` replicas for site north through
   ``labgate.resolver.inventory.push`` (one call, replace mode), the function
   the inventory endpoint runs;
5. unless ``--skip-http``: starts the real portal (uvicorn, in its own
   process) on a loopback port and
   measures ``GET /api/v1/resolve`` over HTTP (``--http-resolves``
   sequential requests on one keep-alive connection, an API token checked on
   each), and pushes ``--push`` replicas for site south through the CLI's
   push (parts of 512 KiB, several requests, as ``labgate dataset push`` does).

Results: a Markdown table on stdout and JSON in benchmarks/results/resolver.json.
Targets (issue 6): resolve p99 under 5 ms; 100,000 replicas pushed in under 30 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: Strong enough for labgate to accept (256 bits).
BENCH_SECRET_KEY = "bench-key-Zq3Xv5Bn7Mk9Lp1Jh3Gf5Dd7Ss9Aa1Qw3Ee5"

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ADMIN_PASSWORD = "bench-admin-password"
SITES = ("east", "west", "north", "south")
LOAD_BATCH = 50_000


def stamp() -> str:
    """Now, as SQLAlchemy stores timezone-aware datetimes in SQLite."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def identifier(n: int) -> str:
    """The canonical identifier of the n-th benchmark dataset."""
    return f"doi:10.{5000 + n % 97}/bench.{n}"


def spelling(n: int, rng: random.Random) -> str:
    """One of the spellings people use for dataset n."""
    name = identifier(n)[4:]
    form = rng.randrange(4)
    if form == 0:
        return "doi:" + name
    if form == 1:
        return "https://doi.org/" + name.upper()
    if form == 2:
        return "DOI:" + name
    return name


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of durations in seconds, as milliseconds."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": round(at(0.50), 3),
        "p90_ms": round(at(0.90), 3),
        "p99_ms": round(at(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


# --- setup -----------------------------------------------------------------------------


def make_settings(data_dir: Path, port: int = 0) -> Any:
    from labgate.config import Settings, SiteConfig

    return Settings(
        data_dir=data_dir,
        admin_password=ADMIN_PASSWORD,
        secret_key=BENCH_SECRET_KEY,
        host="127.0.0.1",
        port=port or 8000,
        sandbox="none",
        sites=[SiteConfig(name=name, data_root=data_dir / f"{name}-data") for name in SITES],
    )


def load(db_path: Path, datasets: int) -> dict[str, float]:
    """Bulk-load datasets and two replicas each with executemany; returns timings."""
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    site_ids = dict(conn.execute("SELECT name, id FROM sites").fetchall())
    now = stamp()
    started = time.perf_counter()
    for start in range(0, datasets, LOAD_BATCH):
        rows = [
            (
                identifier(n),
                "doi",
                f"bench.{n}",
                f"Benchmark dataset {n}",
                "",
                1024 * (n % 1000 + 1),
                "CC-BY-4.0",
                f"https://doi.org/{identifier(n)[4:]}",
                "",
                now,
                now,
            )
            for n in range(start, min(start + LOAD_BATCH, datasets))
        ]
        conn.executemany(
            "INSERT INTO datasets (identifier, scheme, name, title, description, size, license,"
            " landing_page, checksum, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        conn.commit()
    loaded_datasets = time.perf_counter() - started
    started = time.perf_counter()
    # Dataset ids are 1..N in insertion order on a fresh table.
    for start in range(0, datasets, LOAD_BATCH):
        rows = [
            (n + 1, site_ids[site], f"{site}/bench/{n}", 1024, "", None, "inventory", now)
            for n in range(start, min(start + LOAD_BATCH, datasets))
            for site in ("east", "west")
        ]
        conn.executemany(
            "INSERT INTO replicas (dataset_id, site_id, path, size, checksum, verified_at,"
            " source, reported_at) VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )
        conn.commit()
    loaded_replicas = time.perf_counter() - started
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()
    return {
        "datasets_s": round(loaded_datasets, 2),
        "replicas_s": round(loaded_replicas, 2),
        "datasets_per_s": round(datasets / loaded_datasets),
        "replicas_per_s": round(2 * datasets / loaded_replicas),
    }


def in_process_portal(settings: Any) -> Any:
    """The portal's services as the app builds them, without serving HTTP."""
    from labgate.portal.app import build_portal, ensure_site, start_site
    from labgate.resolver.locality import DataLocator
    from labgate.scheduler.instances import InstanceManager

    portal = build_portal(settings)

    async def reporter(_report: Any) -> None:
        return None

    for site in settings.effective_sites:
        with portal.db.session() as session:
            ensure_site(session, site)
        portal.links[site.name] = start_site(portal, site, reporter)
    portal.manager = InstanceManager(
        portal.db,
        portal.catalog,
        portal.links,
        max_instances_per_user=settings.max_instances_per_user,
        events=portal.events,
        box=portal.box,
        data=DataLocator(settings),
    )
    return portal


# --- measurements ----------------------------------------------------------------------


def bench_resolve(portal: Any, datasets: int, count: int, seed: int) -> dict[str, float]:
    from labgate.portal.api.resolve import resolve_dataset

    rng = random.Random(seed)
    ids = [spelling(rng.randrange(datasets), rng) for _ in range(count)]
    for text in ids[:200]:  # warm the page cache and the statement cache
        with portal.db.session() as session:
            resolve_dataset(portal, session, text)
    samples = []
    for text in ids:
        started = time.perf_counter()
        with portal.db.session() as session:
            answer = resolve_dataset(portal, session, text)
        samples.append(time.perf_counter() - started)
        assert len(answer.replicas) == 2, answer
    return percentiles(samples)


def inventory_entries(datasets: int, count: int, site: str) -> Iterator[Any]:
    from labgate.resolver.schemas import InventoryEntry

    for n in range(count):
        yield InventoryEntry(id=identifier(n % datasets), path=f"{site}/bench/{n}", size=1024)


def make_replica_dirs(settings: Any, site: str, paths: Iterable[str]) -> None:
    """Create the pushed paths: a push refuses replica paths missing on the site."""
    root = next(s.data_root for s in settings.sites if s.name == site)
    for path in paths:
        (root / path).mkdir(parents=True, exist_ok=True)


def bench_push(portal: Any, datasets: int, count: int) -> dict[str, Any]:
    from labgate.resolver import inventory, registry

    entries = list(inventory_entries(datasets, count, "north"))
    make_replica_dirs(portal.settings, "north", (e.path for e in entries))
    started = time.perf_counter()
    with portal.db.session() as session:
        result = inventory.push(
            session,
            registry.require_site(session, "north"),
            entries,
            ttl=3600,
            reporter="bench",
            owner_id=None,
        )
    elapsed = time.perf_counter() - started
    assert result.added == min(count, datasets), result
    return {"replicas": count, "seconds": round(elapsed, 2), "per_s": round(count / elapsed)}


class Server:
    """The portal app under uvicorn in its own process (not sharing this one's GIL)."""

    def __init__(self, data_dir: Path, port: int) -> None:
        settings = make_settings(data_dir, port)
        self.port = port
        self.env = {
            **os.environ,
            "LABGATE_DATA_DIR": str(data_dir),
            "LABGATE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "LABGATE_SECRET_KEY": BENCH_SECRET_KEY,
            "LABGATE_SANDBOX": "none",
            "LABGATE_SITES": json.dumps([site.model_dump(mode="json") for site in settings.sites]),
        }
        self.env.pop("LABGATE_CONFIG", None)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "labgate.portal.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.process = subprocess.Popen(command, env=self.env)
        deadline = time.monotonic() + 60
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the portal did not start")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def admin_token(url: str) -> str:
    import httpx

    with httpx.Client(base_url=url) as http:
        login = http.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        login.raise_for_status()
        created = http.post(
            "/api/v1/tokens",
            json={"note": "benchmark", "scopes": ["datasets:write", "sites:report"]},
            headers={"X-CSRF-Token": login.json()["csrf_token"]},
        )
        created.raise_for_status()
        return str(created.json()["token"])


def bench_http(data_dir: Path, datasets: int, count: int, push: int, seed: int) -> dict[str, Any]:
    import httpx

    from labgate.cli.datasets import push_inventory
    from labgate.client import Client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    with Server(data_dir, port):
        token = admin_token(url)
        rng = random.Random(seed + 1)
        ids = [spelling(rng.randrange(datasets), rng) for _ in range(count)]
        headers = {"Authorization": f"token {token}"}
        with httpx.Client(base_url=url, headers=headers) as http:
            for text in ids[:100]:
                http.get("/api/v1/resolve", params={"id": text}).raise_for_status()
            samples = []
            for text in ids:
                started = time.perf_counter()
                response = http.get("/api/v1/resolve", params={"id": text})
                samples.append(time.perf_counter() - started)
                response.raise_for_status()
        out["resolve"] = percentiles(samples)
        if push:
            make_replica_dirs(make_settings(data_dir), "south", (f"south/{n}" for n in range(push)))
            entries = ({"id": identifier(n % datasets), "path": f"south/{n}"} for n in range(push))
            with Client(url, token, timeout=300) as client:
                started = time.perf_counter()
                result = push_inventory(client, "south", entries, merge=False, ttl=3600)
                elapsed = time.perf_counter() - started
            out["push"] = {
                "replicas": push,
                "requests": result["parts"],
                "seconds": round(elapsed, 2),
                "per_s": round(push / elapsed),
            }
    return out


# --- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from labgate.db.session import Database

    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="lg-bench-"))
    if data_dir.exists() and any(data_dir.iterdir()):
        raise SystemExit(f"{data_dir} is not empty; give a new --data-dir")
    settings = make_settings(data_dir)
    results: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "data_dir"},
        "machine": {
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    try:
        portal = in_process_portal(settings)  # migrates, records the sites
        db_file = data_dir / "labgate.db"
        print(f"loading {args.datasets:,} datasets and {2 * args.datasets:,} replicas…", flush=True)
        results["load"] = load(db_file, args.datasets)
        results["db_mib"] = round(db_file.stat().st_size / 1024**2, 1)
        print(f"resolving {args.resolves:,} random identifiers…", flush=True)
        results["resolve"] = bench_resolve(portal, args.datasets, args.resolves, args.seed)
        if args.push:
            print(f"pushing {args.push:,} replicas (in process)…", flush=True)
            results["push"] = bench_push(portal, args.datasets, args.push)
        Database.dispose(portal.db)
        if not args.skip_http:
            print("over HTTP…", flush=True)
            results["http"] = bench_http(
                data_dir, args.datasets, args.http_resolves, args.push, args.seed
            )
    finally:
        if not args.keep and not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    return results


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    rows = [("measure", "result", "target")]
    load_ = results["load"]
    n = results["settings"]["datasets"]
    rows.append(
        (
            f"load {n:,} datasets + {2 * n:,} replicas",
            f"{load_['datasets_s'] + load_['replicas_s']:.1f} s "
            f"({load_['datasets_per_s']:,} datasets/s, {load_['replicas_per_s']:,} replicas/s); "
            f"database {results['db_mib']} MiB",
            "",
        )
    )
    r = results["resolve"]
    rows.append(
        (
            f"resolve, in process ({r['n']:,} random ids)",
            f"p50 {r['p50_ms']} ms, p90 {r['p90_ms']} ms, p99 {r['p99_ms']} ms, "
            f"max {r['max_ms']} ms",
            "p99 < 5 ms",
        )
    )
    if "push" in results:
        p = results["push"]
        rows.append(
            (
                f"inventory push, in process ({p['replicas']:,} replicas, one call)",
                f"{p['seconds']} s ({p['per_s']:,}/s)",
                "< 30 s for 100,000",
            )
        )
    http = results.get("http") or {}
    if "resolve" in http:
        h = http["resolve"]
        rows.append(
            (
                f"GET /api/v1/resolve over HTTP ({h['n']:,} sequential, token auth)",
                f"p50 {h['p50_ms']} ms, p90 {h['p90_ms']} ms, p99 {h['p99_ms']} ms, "
                f"max {h['max_ms']} ms",
                "",
            )
        )
    if "push" in http:
        p = http["push"]
        rows.append(
            (
                f"`labgate dataset push` over HTTP ({p['replicas']:,} replicas, "
                f"{p['requests']} requests)",
                f"{p['seconds']} s ({p['per_s']:,}/s)",
                "< 30 s for 100,000",
            )
        )
    lines = [f"| {' | '.join(row)} |" for row in rows]
    lines.insert(1, "|---|---|---|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", type=int, default=1_000_000, help="datasets to load")
    parser.add_argument("--resolves", type=int, default=10_000, help="in-process resolves")
    parser.add_argument("--http-resolves", type=int, default=2_000, help="resolves over HTTP")
    parser.add_argument("--push", type=int, default=100_000, help="replicas per push (0: none)")
    parser.add_argument("--skip-http", action="store_true", help="no HTTP measurements")
    parser.add_argument("--data-dir", help="an empty directory to use (kept afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--seed", type=int, default=6, help="random seed for the ids")
    args = parser.parse_args()
    results = run(args)
    print()
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "resolver.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
