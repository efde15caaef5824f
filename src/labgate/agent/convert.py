"""Launch specs, adoptions, claims, snapshots and reports to and from their wire messages.

The portal and the agent hold the same plain data classes
(:mod:`labgate.backends.base`, :mod:`labgate.wire`); these functions give
each its message of :mod:`labgate.wire.agent` and back. A round trip gives
back an equal object.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from labgate.agent.fetch import Fetched
from labgate.agent.site import Adoption
from labgate.backends.base import LaunchSpec, Mount, Resources
from labgate.backends.claim import Claim
from labgate.tools.catalog import Tool
from labgate.wire.agent import (
    AdoptionMsg,
    ClaimMsg,
    FetchedMsg,
    FetchRequestMsg,
    LaunchSpecMsg,
    MountMsg,
    ReportMsg,
    SnapshotRefMsg,
    SnapshotRequestMsg,
    SnapshotResultMsg,
)
from labgate.wire.launch import FetchRequest, SnapshotRef, SnapshotRequest, SnapshotResult
from labgate.wire.site import Report

if TYPE_CHECKING:
    from collections.abc import Mapping


def tool_json(tool: Tool) -> dict[str, object]:
    """A catalog tool as JSON (its file path stays on the portal)."""
    return tool.model_dump(mode="json")


def spec_msg(spec: LaunchSpec) -> LaunchSpecMsg:
    """The message of a launch spec."""
    return LaunchSpecMsg(
        instance_id=spec.instance_id,
        owner=spec.owner,
        owner_id=spec.owner_id,
        tool=tool_json(spec.tool),
        base_url=spec.base_url,
        workspace=str(spec.workspace),
        cpu=spec.resources.cpu,
        memory=spec.resources.memory,
        secret=spec.secret,
        env=dict(spec.env),
        mounts=[
            MountMsg(
                source=str(m.source),
                target=m.target,
                read_only=m.read_only,
                root=str(m.root) if m.root is not None else None,
            )
            for m in spec.mounts
        ],
        snapshot=snapshot_ref_msg(spec.snapshot) if spec.snapshot is not None else None,
        image=spec.image,
        options=dict(spec.options),
        params=dict(spec.params),
        on_socket=spec.on_socket,
    )


def spec_of(msg: LaunchSpecMsg, tools: Mapping[str, Tool] | None = None) -> LaunchSpec:
    """The launch spec of a message; ``tools`` reuses already parsed catalog entries."""
    name = str(msg.tool.get("name", ""))
    known = tools.get(name) if tools is not None else None
    tool = known if known is not None and tool_json(known) == msg.tool else Tool(**msg.tool)
    return LaunchSpec(
        instance_id=msg.instance_id,
        owner=msg.owner,
        owner_id=msg.owner_id,
        tool=tool,
        base_url=msg.base_url,
        workspace=Path(msg.workspace),
        resources=Resources(cpu=msg.cpu, memory=msg.memory),
        secret=msg.secret,
        env=dict(msg.env),
        mounts=tuple(
            Mount(Path(m.source), m.target, m.read_only, Path(m.root) if m.root else None)
            for m in msg.mounts
        ),
        snapshot=snapshot_ref_of(msg.snapshot) if msg.snapshot is not None else None,
        image=msg.image,
        options=dict(msg.options),
        params=dict(msg.params),
        on_socket=msg.on_socket,
    )


def adoption_msg(adoption: Adoption) -> AdoptionMsg:
    """The message of an adoption."""
    return AdoptionMsg(
        spec=spec_msg(adoption.spec),
        state=adoption.state,
        backend_state=adoption.backend_state,
        endpoint=adoption.endpoint,
        remaining_start_time=adoption.remaining_start_time,
    )


def adoption_of(msg: AdoptionMsg, tools: Mapping[str, Tool] | None = None) -> Adoption:
    """The adoption of a message."""
    return Adoption(
        spec=spec_of(msg.spec, tools),
        state=msg.state,
        backend_state=msg.backend_state,
        endpoint=msg.endpoint,
        remaining_start_time=msg.remaining_start_time,
    )


def claim_msg(claim: Claim) -> ClaimMsg:
    """The message of a claim."""
    return ClaimMsg(
        instance_id=claim.instance_id,
        owner=claim.owner,
        workspace=str(claim.workspace),
        owner_id=claim.owner_id,
    )


def claim_of(msg: ClaimMsg) -> Claim:
    """The claim of a message."""
    return Claim(msg.instance_id, msg.owner, Path(msg.workspace), msg.owner_id)


def snapshot_ref_msg(ref: SnapshotRef) -> SnapshotRefMsg:
    """The message of a snapshot reference."""
    return SnapshotRefMsg(id=ref.id, kind=ref.kind, reference=ref.reference, digest=ref.digest)


def snapshot_ref_of(msg: SnapshotRefMsg) -> SnapshotRef:
    """The snapshot reference of a message."""
    return SnapshotRef(msg.id, msg.kind, msg.reference, msg.digest)


def snapshot_request_msg(request: SnapshotRequest) -> SnapshotRequestMsg:
    """The message of a snapshot request."""
    return SnapshotRequestMsg(
        snapshot_id=request.snapshot_id,
        instance_id=request.instance_id,
        owner=request.owner,
        tool=request.tool,
    )


def snapshot_request_of(msg: SnapshotRequestMsg) -> SnapshotRequest:
    """The snapshot request of a message."""
    return SnapshotRequest(msg.snapshot_id, msg.instance_id, msg.owner, msg.tool)


def snapshot_result_msg(result: SnapshotResult) -> SnapshotResultMsg:
    """The message of a snapshot result."""
    return SnapshotResultMsg(
        kind=result.kind, reference=result.reference, digest=result.digest, size=result.size
    )


def snapshot_result_of(msg: SnapshotResultMsg) -> SnapshotResult:
    """The snapshot result of a message."""
    return SnapshotResult(msg.kind, msg.reference, msg.digest, msg.size)


def fetch_request_msg(request: FetchRequest) -> FetchRequestMsg:
    """The message of a fetch request."""
    return FetchRequestMsg(**asdict(request))


def fetch_request_of(msg: FetchRequestMsg) -> FetchRequest:
    """The fetch request of a message."""
    return FetchRequest(**msg.model_dump())


def fetched_msg(fetched: Fetched) -> FetchedMsg:
    """The message of a fetched cache entry."""
    return FetchedMsg(
        directory=str(fetched.directory),
        file=str(fetched.file),
        size=fetched.size,
        checksum=fetched.checksum,
        verified=fetched.verified,
        cached=fetched.cached,
    )


def fetched_of(msg: FetchedMsg) -> Fetched:
    """The fetched cache entry of a message."""
    return Fetched(
        Path(msg.directory), Path(msg.file), msg.size, msg.checksum, msg.verified, msg.cached
    )


def report_msg(report: Report) -> ReportMsg:
    """The message of a report."""
    return ReportMsg(
        instance_id=report.instance_id,
        state=report.state,
        kind=report.kind,
        message=report.message,
        backend_state=report.backend_state,
        endpoint=report.endpoint,
        log_tail=report.log_tail,
        data=dict(report.data),
    )


def report_of(msg: ReportMsg) -> Report:
    """The report of a message."""
    return Report(
        instance_id=msg.instance_id,
        state=msg.state,
        kind=msg.kind,
        message=msg.message,
        backend_state=msg.backend_state,
        endpoint=msg.endpoint,
        log_tail=msg.log_tail,
        data=dict(msg.data),
    )
