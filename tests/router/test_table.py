"""The route table: values, snapshots, generations, listeners."""

from __future__ import annotations

import json

import pytest

from labgate.router.activity import Activity, ActivityLog, merge
from labgate.wire.routes import (
    Route,
    RouterControl,
    RouteTable,
    TokenInfo,
    UpstreamAddress,
    UserInfo,
    parse_upstream,
)


def test_parse_upstream() -> None:
    assert parse_upstream("http://127.0.0.1:8080") == UpstreamAddress("127.0.0.1", 8080)
    assert parse_upstream("127.0.0.1:8080/") == UpstreamAddress("127.0.0.1", 8080)
    assert parse_upstream("http://[::1]:81") == UpstreamAddress("::1", 81)
    assert parse_upstream("unix:/run/x.sock") == UpstreamAddress(path="/run/x.sock")
    assert str(parse_upstream("http://[::1]:81")) == "http://[::1]:81"
    assert str(parse_upstream("unix:/run/x.sock")) == "unix:/run/x.sock"
    tunnel = parse_upstream("tunnel:east/abc")
    assert tunnel == UpstreamAddress(site="east", instance="abc") and tunnel.is_tunnel
    assert str(tunnel) == "tunnel:east/abc" and not tunnel.is_unix
    assert tunnel.key != parse_upstream("tunnel:east/abd").key
    bad_ones = ("https://h:1", "http://h", "http://h:0", "http://h:99999", "unix:rel", "h:1/x", "")
    for bad in (*bad_ones, "tunnel:east", "tunnel:/abc", "tunnel:east/a/b"):
        with pytest.raises(ValueError):
            parse_upstream(bad)


def test_route_values() -> None:
    route = Route("abc", "http://127.0.0.1:1", 7, frozenset({8}), upstream_token="tok")
    assert route.allows(7) and route.allows(8) and not route.allows(9)
    assert route.prefix == b"/i/abc"
    assert b"Authorization: token tok\r\n" in route.head_lines
    assert Route.from_dict(json.loads(json.dumps(route.to_dict()))) == route
    with pytest.raises(ValueError):
        Route("a/b", "http://127.0.0.1:1", 1)
    with pytest.raises(ValueError):
        Route("ab", "http://127.0.0.1:1", 1, state="stopped")  # type: ignore[arg-type]


def test_snapshot_round_trip_and_generation() -> None:
    table = RouteTable()
    assert isinstance(table, RouterControl)
    start = table.generation
    table.set_user(UserInfo(1, "ada", is_admin=True, sessions_valid_after=5.0))
    table.set_token("h" * 64, TokenInfo(1, frozenset({"admin"}), 10.0))
    table.revoke_session("s", 100.0)
    table.add_route(Route("r", "unix:/x", 1, state="starting", keep_prefix=False))
    assert table.generation == start + 3  # routes do not change credentials
    copy = RouteTable()
    copy.resync(json.loads(json.dumps(table.snapshot())))
    assert copy.snapshot() == table.snapshot()
    assert copy.routes["r"].address.path == "/x"
    with pytest.raises(ValueError):
        copy.resync({"version": 99})


def test_removal_listeners_and_purge() -> None:
    table = RouteTable()
    removed: list[str] = []
    table.on_route_removed(removed.append)
    table.add_route(Route("a", "unix:/a", 1))
    table.add_route(Route("b", "unix:/b", 1))
    table.remove_route("a")
    table.remove_route("unknown")
    table.resync({"version": 1, "routes": [Route("c", "unix:/c", 1).to_dict()]})
    assert removed == ["a", "b"]
    table.revoke_session("old", 10.0)
    table.revoke_session("new", 1e12)
    assert table.purge_revoked(now=100.0) == 1
    assert set(table.revoked) == {"new"}


def test_narrowed_access_is_told_on_replace_and_resync() -> None:
    """What closes a revoked user's WebSockets: any route that lets fewer users in."""
    table = RouteTable()
    narrowed: list[tuple[str, frozenset[int]]] = []
    table.on_access_narrowed(lambda route: narrowed.append((route.instance_id, route.access)))
    table.add_route(Route("a", "unix:/a", 1))
    table.add_route(Route("a", "unix:/a", 1, access=frozenset({2, 3})))  # wider: nothing
    assert narrowed == []
    table.add_route(Route("a", "unix:/a", 1, access=frozenset({3})))
    assert narrowed == [("a", frozenset({3}))]
    table.resync({"version": 1, "routes": [Route("a", "unix:/a", 1).to_dict()]})
    assert narrowed[-1] == ("a", frozenset())
    table.add_route(Route("a", "unix:/a", 4))  # another owner
    assert len(narrowed) == 3


def test_activity_users_merge_by_latest_request() -> None:
    merged = merge([Activity(1.0, users={7: 1.0, 8: 5.0}), Activity(2.0, users={7: 3.0})])
    assert merged.users == {7: 3.0, 8: 5.0}
    assert Activity.from_dict(json.loads(json.dumps(merged.to_dict()))) == merged


def test_tunnel_sites_in_snapshots_streams_and_listeners() -> None:
    from labgate.wire.stream import RoutePublisher, apply_message

    table = RoutePublisher()
    changed: list[str] = []
    copy = RouteTable()
    copy.on_tunnel_site_changed(changed.append)
    table.set_tunnel_site("east", "e1")
    table.set_tunnel_site("west", "w1")
    copy.resync(json.loads(json.dumps(table.snapshot())))
    assert copy.tunnel_sites == {"east": "e1", "west": "w1"}
    assert sorted(changed) == ["east", "west"]
    changed.clear()
    for message in (
        {"op": "set_tunnel_site", "site": "east", "epoch": "e2"},
        {"op": "set_tunnel_site", "site": "east", "epoch": "e2"},  # again: no change
        {"op": "remove_tunnel_site", "site": "west"},
        {"op": "remove_tunnel_site", "site": "nowhere"},
    ):
        apply_message(copy, message)
    assert copy.tunnel_sites == {"east": "e2"} and changed == ["east", "west"]
    copy.resync({"version": 1})  # a snapshot without them: every door closes
    assert copy.tunnel_sites == {} and changed[-1] == "east"


def test_activity_log_and_merge() -> None:
    log = ActivityLog()
    assert log.get("x") is None
    counter = log.counter("x")
    counter.bytes_in += 5
    counter.open_websockets = 1
    assert log.get("x") == Activity(0.0, 5, 0, 1)
    log.forget("x")
    assert log.get("x") is not None  # an open WebSocket keeps it
    counter.open_websockets = 0
    log.forget("x")
    assert log.all() == {}
    merged = merge([Activity(1.0, 1, 2, 1), Activity(3.0, 10, 20, 2)])
    assert merged == Activity(3.0, 11, 22, 3)
    assert Activity.from_dict(merged.to_dict()) == merged
