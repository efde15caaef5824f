"""Instructions the router's process runs per proxied request, counted by callgrind.

Wall-clock figures on a shared 2-core VM scatter by 10-20 % from run to run;
instruction counts do not: valgrind's ``callgrind`` counts the user-space
instructions the router executes (the kernel's work is not in them), the same
for the same build and load whatever else the machine does. This makes them
the measure for changes to the router's own per-request work, beside
``router.py``'s end-to-end figures.

One run, on loopback only:

- nginx (one worker) as the upstream, answering ``/small`` with ``hello world``;
- one router, in-process in a Python under callgrind with instrumentation off
  (``--instr-atstart=no``), one route to that upstream, a session cookie checked
  on every request, exactly the path of ``router.py``'s ``labgate`` front;
- ``wrk -t1 -c8`` for 3 s to warm up, then instrumentation on for ``--duration``
  seconds of ``wrk`` (under callgrind the router serves about 3,000 requests/s),
  then off and the counts dumped; with ``--websocket``, ``router.py``'s echo
  client on 8 WebSockets to its echo upstream instead, counting round trips
  (each is two 7-byte messages relayed).

It prints the instructions per request and the functions that cost most (self
and inclusive, per request), as a table and as JSON (``--json``); results go to
``benchmarks/results/router-instructions-*.json``. Needs ``valgrind``, ``nginx``
and ``wrk`` (``apt-get install valgrind nginx wrk``).

    .venv/bin/python benchmarks/router_instructions.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from router import free_port, wait_port  # noqa: E402

#: The router in one process, for valgrind: one route, one user, a session cookie.
ROUTER = """
import asyncio, gc, os, sys
import uvloop
from labgate.router._native import check
from labgate.router.server import Router
from labgate.security import SessionSigner
from labgate.wire.routes import Route, RouteTable, UserInfo

async def main():
    table = RouteTable()
    table.load(users=[UserInfo(1, "bench")], tokens=[])
    table.add_route(Route("bench", "http://127.0.0.1:" + os.environ["UPSTREAM"], 1))
    table.add_route(Route("ws", "http://127.0.0.1:" + os.environ["WS_UPSTREAM"], 1))
    signer = SessionSigner("bench-instructions-signing-key-0000", 3600)
    router = Router(table, signer, "http://127.0.0.1:9")
    await router.listen("127.0.0.1", int(os.environ["PORT"]))
    value, _ = signer.issue(1)
    gc.freeze()
    print(check(), router.options.session_cookie + "=" + value, flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


def nginx_upstream(work: Path, port: int) -> Path:
    conf = work / "static.conf"
    conf.write_text(
        f"worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
        "events { worker_connections 1024; }\n"
        "http { access_log off; keepalive_requests 1000000;\n"
        f" server {{ listen 127.0.0.1:{port};\n"
        '  location ~ /small$ { default_type text/plain; return 200 "hello world\\n"; } } }\n'
    )
    return conf


def wrk(port: int, cookie: str, seconds: float) -> int:
    """Run wrk on the router; the number of requests it completed."""
    out = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds:g}s", "-H", f"Cookie: {cookie}",
         f"http://127.0.0.1:{port}/i/bench/small"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise RuntimeError(f"wrk said no request count: {out}")
    return int(found[1])


def ws_echo(port: int, cookie: str, seconds: float) -> int:
    """Echo WebSocket messages through the router on 8 connections (router.py's client);
    the number of round trips."""
    out = subprocess.run(
        [sys.executable, str(HERE / "router.py"), "_ws-echo", str(port), "/i/ws/echo",
         cookie.split("=", 1)[1], "8", str(seconds)],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    return round(json.loads(out.strip().splitlines()[-1])["roundtrips_s"] * seconds)


def annotate(dump: Path, inclusive: bool) -> list[tuple[int, str]]:
    """(instructions, function) from callgrind_annotate, most first."""
    out = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", str(dump)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        found = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if found:
            rows.append((int(found[1].replace(",", "")), short(found[2])))
    return rows


def short(name: str) -> str:
    """A function's name without its file's path and its object's."""
    name = re.sub(r"\s*\[[^\]]*\]$", "", name)
    return name.rsplit(":", 1)[-1] if ":" in name else name


def measure(duration: float, top: int, websocket: bool) -> dict[str, object]:
    for tool in ("valgrind", "callgrind_annotate", "callgrind_control", "wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is missing: apt-get install valgrind nginx wrk")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="labgate-instr-") as tmp:
        work = Path(tmp)
        upstream, port, ws_port = free_port(), free_port(), free_port()
        (work / "router.py").write_text(ROUTER)
        procs: list[subprocess.Popen[str]] = []
        try:
            conf = nginx_upstream(work, upstream)
            procs.append(subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)]))
            wait_port(upstream)
            procs.append(
                subprocess.Popen([sys.executable, str(HERE / "router.py"), "_ws-upstream",
                                  str(ws_port)])
            )  # fmt: skip
            wait_port(ws_port)
            router = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                 f"--callgrind-out-file={work}/callgrind.out", sys.executable,
                 str(work / "router.py")],
                env={
                    **os.environ,
                    "UPSTREAM": str(upstream),
                    "WS_UPSTREAM": str(ws_port),
                    "PORT": str(port),
                },
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            procs.append(router)
            said = router.stdout.readline().split() if router.stdout is not None else []
            if len(said) != 2:
                raise RuntimeError("the router under valgrind did not start")
            build, cookie = said
            wait_port(port, timeout=120)
            load = ws_echo if websocket else wrk
            load(port, cookie, 3)
            control = ["callgrind_control", str(router.pid)]
            subprocess.run([*control, "-i", "on"], capture_output=True, check=True)
            requests = load(port, cookie, duration)
            subprocess.run([*control, "-i", "off"], capture_output=True, check=True)
            subprocess.run([*control, "-d"], capture_output=True, check=True)
            dump = next(iter(sorted(work.glob("callgrind.out.*"))))
            selfs = annotate(dump, inclusive=False)
            inclusive = annotate(dump, inclusive=True)
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    total = next(count for count, name in selfs if name == "PROGRAM TOTALS")
    per = [(count / requests, name) for count, name in selfs if name != "PROGRAM TOTALS"]
    within = [(count / requests, name) for count, name in inclusive if name != "PROGRAM TOTALS"]
    return {
        "load": "websocket echo round trips" if websocket else "small requests",
        "build": build,
        "requests": requests,
        "instructions": total,
        "instructions_per_request": round(total / requests),
        "top_self": [{"function": n, "per_request": round(c)} for c, n in per[:top]],
        "top_inclusive": [{"function": n, "per_request": round(c)} for c, n in within[:top]],
    }


def report(result: dict[str, object]) -> str:
    lines = [
        f"router build: {result['build']}; counted: {result['load']}",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| requests (or round trips) counted | {result['requests']:,} |",
        f"| instructions (user space) | {result['instructions']:,} |",
        f"| instructions per request (or round trip) | {result['instructions_per_request']:,} |",
        "",
        "| costliest functions, self | instructions per request |",
        "|---|---:|",
    ]
    for row in result["top_self"]:  # type: ignore[attr-defined]
        lines.append(f"| `{row['function']}` | {row['per_request']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds counted (8)")
    parser.add_argument("--top", type=int, default=15, help="functions listed (15)")
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    parser.add_argument(
        "--websocket",
        action="store_true",
        help="count WebSocket echo round trips (8 connections) instead of small requests",
    )
    args = parser.parse_args()
    result = measure(args.duration, args.top, args.websocket)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"router-instructions-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report(result))
        print()
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("top_")}))


if __name__ == "__main__":
    main()
