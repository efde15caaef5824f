"""How fast a big labgate starts: the portal on a full database, a router resyncing its routes.

Issue 19's targets: a portal with 50,000 users, 10,000 running instances and
1,000,000 events is ready in under 5 s; a router resyncs 10,000 routes in
under 1 s. (JupyterHub with 50,000 users took over 15 minutes to start.)

One run, on loopback only, in a temporary directory it removes again
(``--keep DIR``: in ``DIR``, kept, and a SQLite database filled there before at
the same sizes is used again instead of filling a new one):

1. A database (SQLite in the directory, or a fresh PostgreSQL database made
   with ``--database-url``) is migrated and filled in bulk: ``--users`` users,
   a network site ``far`` (``reach = "direct"``, its agent not connected),
   ``--instances`` running instances on it, spread over the users, each with a
   reachable-looking endpoint, and ``--events`` events spread over them.
2. ``labgate serve`` starts on it ``--rounds`` times: the time from the
   process start until ``/healthz`` answers 200 is *portal ready* (migrations
   checked, every unfinished instance handed back to its site, the route
   table loaded and the router listening). The same on an empty database is
   the floor (interpreter, imports, the router process). The empty and the
   full database take turns, round by round, so load from elsewhere on the
   machine falls on both alike.
3. ``labgate router --portal …`` starts beside each portal: a router listens
   only once it holds the route snapshot, so the time until its port answers
   is *router ready*; the route snapshot of an empty portal is its floor, and
   the difference is the resync of the routes.

Prints a Markdown table and JSON (also ``benchmarks/results/startup-<time>.json``).

    .venv/bin/python benchmarks/startup.py                       # SQLite, full size
    .venv/bin/python benchmarks/startup.py --quick               # a tenth of it, 1 round
    .venv/bin/python benchmarks/startup.py --keep /tmp/startup   # fill once, time again later
    .venv/bin/python benchmarks/startup.py --database-url postgresql+psycopg://u:p@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from labgate.db.models import Instance, InstanceEvent, InstanceState, Site, User, utcnow
from labgate.db.session import make_engine, migrate

RESULTS = Path(__file__).with_name("results")
SECRET_KEY = "benchmark-startup-key-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1"
ADMIN_PASSWORD = "benchmark-admin-password"
#: The shape of a stored argon2 hash: these users never sign in here.
USER_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHRzb21lc2FsdA"
    "$3n8rQ8V3w0m1aPq1k6cJQ0rA4o1p1ZkqzZ2m2e6VfLk"
)
TARGET_PORTAL_S = 5.0
TARGET_ROUTER_S = 1.0
BATCH = 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the database -------------------------------------------------------------------


def fresh_postgres(server_url: str, name: str) -> str:
    """A new empty database ``name`` on the server of ``server_url``; its URL."""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_postgres(server_url: str, name: str) -> None:
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def fill(url: str, users: int, instances: int, events: int) -> dict[str, float]:
    """Migrate the database at ``url`` and fill it in bulk; seconds each step took."""
    engine = make_engine(url)
    took: dict[str, float] = {}
    start = time.perf_counter()
    migrate(engine)
    took["migrate"] = time.perf_counter() - start
    now = utcnow()
    rng = random.Random(19)
    with Session(engine) as session:
        start = time.perf_counter()
        for first in range(0, users, BATCH):
            rows = [
                {"name": f"user{n:06d}", "password_hash": USER_HASH}
                for n in range(first, min(first + BATCH, users))
            ]
            session.execute(insert(User), rows)
        site = Site(name="far", backend="process", kind="network", reach="direct")
        session.add(site)
        session.flush()
        user_ids = list(session.scalars(select(User.id)))
        took["users"] = time.perf_counter() - start
        start = time.perf_counter()
        ids = [f"b{n:011d}" for n in range(instances)]
        started = now - timedelta(hours=1)
        for first in range(0, instances, BATCH):
            rows = [
                {
                    "id": instance_id,
                    "owner_id": rng.choice(user_ids),
                    "tool": "demo",
                    "site_id": site.id,
                    "state": InstanceState.running,
                    "resources": {"cpu": 0.5, "memory": 512 * 1024**2},
                    "backend_state": {"instance_id": instance_id, "pid": 1, "start_time": 1},
                    "endpoint": f"http://10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}:8888",
                    "created_at": started,
                    "started_at": started,
                    "ready_at": started,
                }
                for n, instance_id in enumerate(ids[first : first + BATCH], start=first)
            ]
            session.execute(insert(Instance), rows)
        took["instances"] = time.perf_counter() - start
        start = time.perf_counter()
        for first in range(0, events, BATCH):
            rows = [
                {
                    "instance_id": ids[n % len(ids)],
                    "state": InstanceState.running,
                    "kind": "progress",
                    "message": "waiting for the health check",
                    "created_at": started,
                }
                for n in range(first, min(first + BATCH, events))
            ]
            session.execute(insert(InstanceEvent), rows)
        took["events"] = time.perf_counter() - start
        session.commit()
    engine.dispose()
    return took


# --- timing processes -------------------------------------------------------------------


def environment(data_dir: Path, url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    env.update(
        LABGATE_DATA_DIR=str(data_dir),
        LABGATE_DATABASE_URL=url,
        LABGATE_PORT=str(port),
        LABGATE_HOST="127.0.0.1",
        LABGATE_SECRET_KEY=SECRET_KEY,
        LABGATE_ADMIN_PASSWORD=ADMIN_PASSWORD,
        # Network sites are not reported lost while this runs.
        LABGATE_SITE_GRACE_PERIOD="3600",
    )
    return env


def wait_answer(url: str, process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until ``url`` answers 200 (any answer for a router: it listens once synced)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code < 500:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def labgate(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "labgate", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def loaded(log: Path) -> dict[str, int]:
    """What the last route table load in ``log`` held: routes, users, tokens."""
    found = re.findall(r"route table: (\d+) routes, (\d+) users, (\d+) tokens", log.read_text())
    if not found:
        raise RuntimeError(f"no route table load in {log}")
    routes, users, tokens = (int(n) for n in found[-1])
    return {"routes": routes, "users": users, "tokens": tokens}


def time_round(data_dir: Path, url: str) -> tuple[float, float]:
    """One portal start on ``url`` and one router start beside it: their ready times."""
    port = free_port()
    serve = labgate("serve", env=environment(data_dir, url, port), log=data_dir / "serve.log")
    try:
        portal_time = wait_answer(f"http://127.0.0.1:{port}/healthz", serve, 600)
        router_port = free_port()
        router = labgate(
            "router",
            "--portal",
            f"http://127.0.0.1:{port}",
            env=environment(data_dir, url, router_port),
            log=data_dir / "router.log",
        )
        try:
            router_time = wait_answer(f"http://127.0.0.1:{router_port}/healthz", router, 120)
        finally:
            stop(router)
    finally:
        stop(serve)
    return portal_time, router_time


def counts(url: str) -> dict[str, int]:
    """How many users (the ones this script makes), instances and events ``url`` holds."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                "users": conn.scalar(
                    select(func.count()).select_from(User).where(User.name.like("user%"))
                ),
                "instances": conn.scalar(select(func.count()).select_from(Instance)),
                "events": conn.scalar(select(func.count()).select_from(InstanceEvent)),
            }
    finally:
        engine.dispose()


def filled_before(url: str, size: dict[str, int]) -> bool:
    """Whether the SQLite database at ``url`` was filled by this script at ``size``."""
    path = make_url(url).database
    if not path or not Path(path).exists():
        return False
    found = counts(url)
    if found != size:
        raise RuntimeError(f"{path} holds {found}, not {size}: remove it or --keep elsewhere")
    return True


def measure(url: str, work: Path, size: dict[str, int], rounds: int) -> dict[str, Any]:
    """Fill (or reuse) the database at ``url`` and time ``rounds`` starts on it."""
    return measure_all({"only": url}, work, {"only": size}, rounds)["only"]


def measure_all(
    urls: dict[str, str], work: Path, sizes: dict[str, dict[str, int]], rounds: int
) -> dict[str, dict[str, Any]]:
    """Fill every database, then time their starts in turns, round by round.

    Taking turns puts a burst of load from elsewhere on the machine into every
    database's times alike, not into one database's figures only.
    """
    data_dirs, filled = {}, {}
    for label, url in urls.items():
        size = sizes[label]
        data_dirs[label] = work / f"data-{size['instances']}"
        data_dirs[label].mkdir(mode=0o700, exist_ok=True)
        if url.startswith("sqlite") and filled_before(url, size):
            filled[label] = {}
        else:
            filled[label] = fill(url, size["users"], size["instances"], size["events"])
    times: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label in urls}
    for _ in range(rounds):
        for label, url in urls.items():
            portal, router = time_round(data_dirs[label], url)
            times[label][0].append(portal)
            times[label][1].append(router)
    results = {}
    for label, size in sizes.items():
        table = loaded(data_dirs[label] / "serve.log")
        # Besides the users filled in, the portal's own accounts: the first admin (made
        # only in a database with no users) and, once a portal ran, the warm pools' one.
        own = table["users"] - size["users"]
        if table["routes"] != size["instances"] or not 0 <= own <= 2:
            raise RuntimeError(f"the portal loaded {table}, not the {size} filled in")
        results[label] = {
            **size,
            "fill_s": filled[label],
            "loaded": table,
            "portal_ready_s": times[label][0],
            "router_ready_s": times[label][1],
        }
    return results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--database-url", help="a PostgreSQL server (its postgres database); default SQLite"
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes, 1 round")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR and keep it; a SQLite database filled there before is used again",
    )
    args = parser.parse_args()
    if args.quick:
        args.users, args.instances, args.events = (
            args.users // 10,
            args.instances // 10,
            args.events // 10,
        )
        args.rounds = 1
    if args.keep:
        work = args.keep.resolve()
        work.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="labgate-startup-"))
    os.chmod(work, 0o700)
    sizes = {
        "empty": {"users": 0, "instances": 0, "events": 0},
        "full": {"users": args.users, "instances": args.instances, "events": args.events},
    }
    results: dict[str, Any] = {"database": "postgresql" if args.database_url else "sqlite"}
    names = {label: f"labgate_bench_startup_{label}" for label in sizes}
    try:
        if args.database_url:
            urls = {label: fresh_postgres(args.database_url, names[label]) for label in sizes}
        else:
            urls = {label: f"sqlite:///{work}/{label}.db" for label in sizes}
        results.update(measure_all(urls, work, sizes, args.rounds))
    finally:
        if args.database_url:
            for name in names.values():
                drop_postgres(args.database_url, name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(results)


def report(results: dict[str, Any]) -> None:
    empty, full = results["empty"], results["full"]
    portal, floor = median(full["portal_ready_s"]), median(empty["portal_ready_s"])
    router, router_floor = median(full["router_ready_s"]), median(empty["router_ready_s"])
    results["summary"] = {
        "portal_ready_s": portal,
        "portal_floor_s": floor,
        "router_ready_s": router,
        "router_floor_s": router_floor,
        "router_resync_s": router - router_floor,
        "portal_target_met": portal < TARGET_PORTAL_S,
        "router_target_met": router - router_floor < TARGET_ROUTER_S,
    }
    size = f"{full['users']:,} users, {full['instances']:,} running, {full['events']:,} events"
    print(f"\n{results['database']}: {size} (median of {len(full['portal_ready_s'])})\n")
    print("| what | empty database | full database | target |")
    print("|---|---:|---:|---:|")
    print(f"| portal ready (s) | {floor:.2f} | {portal:.2f} | < {TARGET_PORTAL_S:g} |")
    print(f"| router ready (s) | {router_floor:.2f} | {router:.2f} | |")
    print(f"| router resync of the routes (s) | | {router - router_floor:.2f} | < 1 |")
    fill_s = full["fill_s"]
    if fill_s:
        print("\nfilling took " + ", ".join(f"{k} {v:.1f} s" for k, v in fill_s.items()))
    else:
        print("\nthe database filled before was used again")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
