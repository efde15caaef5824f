"""The agent protocol's messages: round trips, versions, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from labgate.agent import convert
from labgate.agent.site import Adoption
from labgate.backends.base import LaunchSpec, Mount, Resources
from labgate.backends.claim import Claim
from labgate.tools.catalog import Tool
from labgate.wire.agent import (
    PROTOCOL_VERSION,
    Command,
    Heartbeat,
    Hello,
    ProtocolError,
    dump,
    parse,
)
from labgate.wire.launch import SnapshotRef, SnapshotRequest, SnapshotResult
from labgate.wire.site import Report


def _spec() -> LaunchSpec:
    tool = Tool(name="demo", title="Demo", process={"command": ["python3", "-m", "x"]})
    return LaunchSpec(
        instance_id="abc123",
        owner="alice",
        owner_id=7,
        tool=tool,
        base_url="/i/abc123/",
        workspace=Path("alice"),
        resources=Resources(cpu=0.5, memory=256 * 1024**2),
        secret="s3cret",
        env={"LABGATE_DATA_IRIS": "/data/iris"},
        mounts=(Mount(Path("/srv/data/iris"), "/data/iris", True, Path("/srv/data")),),
        snapshot=SnapshotRef("snap1", "archive", "snap1.tar.gz", "sha256:00"),
        image="localhost/labgate/demo:2",
        options={"partition": "gpu", "time": "1:00:00"},
    )


def test_launch_spec_round_trip_gives_back_an_equal_spec() -> None:
    spec = _spec()
    message = convert.spec_msg(spec)
    again = convert.spec_of(type(message).model_validate_json(message.model_dump_json()))
    assert again == spec


def test_a_known_tool_is_reused_only_when_it_is_the_same() -> None:
    spec = _spec()
    message = convert.spec_msg(spec)
    assert convert.spec_of(message, {"demo": spec.tool}).tool is spec.tool
    other = Tool(name="demo", title="Other demo", process={"command": ["true"]})
    assert convert.spec_of(message, {"demo": other}).tool == spec.tool


def test_adoption_claim_snapshot_and_report_round_trips() -> None:
    adoption = Adoption(_spec(), "running", {"pid": 12}, "http://10.0.0.2:4000", 3.5)
    assert convert.adoption_of(convert.adoption_msg(adoption)) == adoption
    claim = Claim("abc123", "bob", Path("bob"), 8)
    assert convert.claim_of(convert.claim_msg(claim)) == claim
    ref = SnapshotRef("s", "image", "reg/x:1", "sha256:1")
    assert convert.snapshot_ref_of(convert.snapshot_ref_msg(ref)) == ref
    request = SnapshotRequest("s", "abc123", "alice", "demo")
    assert convert.snapshot_request_of(convert.snapshot_request_msg(request)) == request
    result = SnapshotResult("image", "reg/x:1", "sha256:1", 42)
    assert convert.snapshot_result_of(convert.snapshot_result_msg(result)) == result
    report = Report("abc123", "running", message="ready", backend_state={"pid": 1}, data={"a": 1})
    assert convert.report_of(convert.report_msg(report)) == report


def test_messages_parse_by_their_type() -> None:
    hello = Hello(site="edge", agent_version="0.1", boot="b", backend="process")
    assert parse(dump(hello)) == hello
    command = Command(id="c1", op="stop", args={"instance_id": "x"})
    assert parse(dump(command)) == command


def test_another_protocol_version_is_refused_with_both_versions() -> None:
    text = dump(Hello(site="edge", agent_version="9", boot="b", backend="process", v=99))
    with pytest.raises(ProtocolError) as caught:
        parse(text)
    assert "99" in str(caught.value) and str(PROTOCOL_VERSION) in str(caught.value)


@pytest.mark.parametrize(
    "text",
    ['{"type": "launch-everything"}', "not json", '{"type": "command", "id": "x", "op": "rm"}'],
)
def test_anything_else_is_a_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse(text)


def test_a_tools_reason_longer_than_a_reason_needs_is_a_protocol_error() -> None:
    """What an agent says of its tools shows on every user's tools page: it gets 2,000
    characters a reason, in its hello and its heartbeats."""
    fine = Heartbeat(time=1.0, tools={"demo": "x" * 2000})
    assert parse(dump(fine)) == fine
    for message in (
        '{"type": "heartbeat", "v": 2, "time": 1, "tools": {"demo": "%s"}}' % ("x" * 2001),
        '{"type": "hello", "v": 2, "site": "s", "agent_version": "1", "boot": "b", '
        '"backend": "process", "tools": {"demo": "%s"}}' % ("x" * 2001),
    ):
        with pytest.raises(ProtocolError):
            parse(message)
