"""labgate.router: the data plane, a fast asyncio reverse proxy in front of instances.

``/i/<instance-id>/…`` goes to that instance after an in-memory check of the
session cookie or API token and the instance's access list; everything else
goes to the portal. See ``docs/router.md``. The route table, the route stream
and the activity and statistics reports are :mod:`labgate.wire`.

Modules::

    auth.py      credentials and access checks, in memory
    http.py      limits, header sets, request-target checks
    exchange.py  per-request state and the head sent upstream
    proxy.py     ClientConnection: the client-side protocol
    upstream.py  UpstreamConnection and UpstreamPool
    pages.py     the router's own answers (errors, redirects)
    context.py   RouterOptions, shared state, the timeout sweeper
    activity.py  activity counters per route
    server.py    Router, start_router
    sync.py      RouteSync (follow the stream), ActivityReporter
    workers.py   run_router_process, spawn_workers (SO_REUSEPORT)
    supervisor.py  WorkerSupervisor: dead workers replaced, with a backoff
    _native.py   which modules are compiled (mypyc), and whether to use them
"""

from __future__ import annotations

# First: the compiled hot path, when built and current (see _native).
from labgate.router import _native  # noqa: F401
from labgate.router.context import RouterOptions
from labgate.router.server import Router, options_from_settings, start_router
from labgate.router.supervisor import WorkerSupervisor
from labgate.router.sync import ActivityReporter, RouteSync
from labgate.router.workers import (
    WorkerConfig,
    run_router_process,
    spawn_workers,
    stop_workers,
    worker_config,
)
from labgate.wire.activity import Activity, merge
from labgate.wire.routes import (
    Route,
    RouterControl,
    RouteTable,
    TokenInfo,
    UpstreamAddress,
    UserInfo,
    parse_upstream,
)
from labgate.wire.stream import STREAM_MEDIA_TYPE, STREAM_PATH, RoutePublisher, apply_message

__all__ = [
    "STREAM_MEDIA_TYPE",
    "STREAM_PATH",
    "Activity",
    "ActivityReporter",
    "Route",
    "RoutePublisher",
    "RouteSync",
    "RouteTable",
    "Router",
    "RouterControl",
    "RouterOptions",
    "TokenInfo",
    "UpstreamAddress",
    "UserInfo",
    "WorkerConfig",
    "WorkerSupervisor",
    "apply_message",
    "merge",
    "options_from_settings",
    "parse_upstream",
    "run_router_process",
    "spawn_workers",
    "start_router",
    "stop_workers",
    "worker_config",
]
