"""labgate.wire: the messages that cross between portal, routers and site agents.

Everything here could travel over a network and is importable by any layer
(the router included), so it imports nothing of labgate's own but ``wire``.

Modules::

    routes.py    Route, UserInfo, TokenInfo, RouterControl, RouteTable: what
                 the portal publishes and every router holds a copy of
    stream.py    RoutePublisher and the route stream's format (NDJSON messages)
    activity.py  Activity per instance, as routers report it, and merge
    stats.py     RouterStats: request counts and the latency histogram routers report
"""
