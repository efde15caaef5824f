"""What ``labgate doctor`` checks on a containers site, beyond "the engine answers".

- **Registry** (``snapshot_registry``): it answers ``/v2/`` (200, or 401 when it
  wants the configured credentials), and the engine trusts it: a plain-HTTP
  registry must be marked insecure in the engine's configuration
  (``registries.conf`` for Podman, ``insecure-registries`` for Docker), or
  every snapshot push fails.
- **Images**: every tool this site runs has its image on the engine; a
  missing one fails when the site never pulls, and is a warning otherwise
  (the first launch pulls it, which needs a registry the engine can reach).
- **Runtime**: a throwaway container, with the site's own confinement
  (capabilities dropped, ``no-new-privileges``, pids limit, default ulimits),
  is created and started from one of those images, then removed: an OCI
  runtime or cgroup setting that cannot work here (crun with hybrid cgroups,
  ulimits above the machine's) shows now rather than at the first launch.

Each function returns :class:`~labgate.backends.base.Diagnosis` objects and
blocks (the doctor is a command line program).
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
from typing import TYPE_CHECKING, Any

import httpx

from labgate.backends.base import Diagnosis

if TYPE_CHECKING:
    from labgate.backends.containers import ContainerBackend
    from labgate.tools.catalog import Tool

REGISTRY_TIMEOUT = 5.0
#: Words of an OCI runtime that started the container but found no ``sh`` to run: the
#: runtime itself works.
NO_SHELL = ("executable file not found", "no such file or directory")


def registry_checks(backend: ContainerBackend) -> list[Diagnosis]:
    """The snapshot registry answers, and the engine trusts it."""
    registry = backend.registry
    if registry is None:
        return [
            Diagnosis(
                "ok",
                "no snapshot_registry: image snapshots stay on this engine (this site only)",
            )
        ]
    url = f"{registry.scheme}://{registry.host}/v2/"
    auth = (registry.username, registry.password) if registry.username else None
    try:
        response = httpx.get(url, timeout=REGISTRY_TIMEOUT, auth=auth)
    except httpx.HTTPError as exc:
        return [
            Diagnosis(
                "fail",
                f"the snapshot registry does not answer at {url}: {exc}",
                "start the registry, or fix snapshot_registry (http:// for a plain-HTTP one)",
            )
        ]
    found: list[Diagnosis] = []
    if response.status_code == 401:
        found.append(
            Diagnosis(
                "fail" if registry.username else "warn",
                f"the snapshot registry at {url} refuses "
                + ("the configured credentials" if registry.username else "anonymous access"),
                "set snapshot_registry_username and snapshot_registry_password",
            )
        )
    elif response.status_code != 200:
        found.append(
            Diagnosis(
                "fail",
                f"{url} answered {response.status_code}: not an OCI registry?",
                "fix snapshot_registry",
            )
        )
    if registry.scheme == "http" and not trusts_plain_http(
        backend.client.api.info(), registry.host
    ):
        found.append(
            Diagnosis(
                "fail",
                f"the engine does not trust the plain-HTTP registry {registry.host}: "
                "snapshot pushes and pulls will fail",
                f'Podman: a [[registry]] with location = "{registry.host}" and insecure = true '
                "in registries.conf; Docker: insecure-registries in daemon.json "
                "(docs/snapshots.md)",
            )
        )
    if not found:
        found.append(Diagnosis("ok", f"the snapshot registry answers at {url} and is trusted"))
    return found


def trusts_plain_http(info: dict[str, Any], host: str) -> bool:
    """Whether the engine (its ``/info``) lets ``host`` be spoken to without TLS."""
    config = info.get("RegistryConfig") or {}
    index = (config.get("IndexConfigs") or {}).get(host)
    if index is not None and index.get("Secure") is False:
        return True
    name = host.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    for cidr in config.get("InsecureRegistryCIDRs") or []:
        try:
            if address in ipaddress.ip_network(cidr, strict=False):
                return True
        except ValueError:
            continue
    return False


def image_checks(backend: ContainerBackend, tools: list[Tool]) -> tuple[list[Diagnosis], str]:
    """Each tool's image on the engine; and one present image for the runtime check."""
    found: list[Diagnosis] = []
    present = ""
    for tool in tools:
        section = backend.tool_section_of(tool)
        if section is None:
            continue
        image = section.image
        if backend.has_image(image):
            present = present or image
            continue
        build = f"`labgate image build {tool.name} --site {backend.site}`"
        if backend.config.pull == "never":
            found.append(
                Diagnosis(
                    "fail",
                    f"tool {tool.name}: image {image} is not on the engine and pull is 'never'",
                    f"build it here: {build}"
                    if section.build
                    else f"put {image} on the engine (the tool ships no recipe to build it)",
                )
            )
        else:
            found.append(
                Diagnosis(
                    "warn",
                    f"tool {tool.name}: image {image} is not on the engine; the first launch "
                    "pulls it",
                    f"pull or build it now: {build} (machines that cannot reach a registry "
                    "must build)"
                    if section.build
                    else f"pull it now (`podman pull {image}`), or put it on the engine",
                )
            )
    if tools and not found:
        found.append(Diagnosis("ok", f"every tool's image is on the engine ({len(tools)})"))
    return found, present


def runtime_check(backend: ContainerBackend, image: str) -> Diagnosis:
    """Create and start a throwaway container with the site's confinement, then remove it."""
    api = backend.client.api
    host = api.create_host_config(
        cap_drop=backend.config.cap_drop,
        security_opt=backend.config.security_opt,
        pids_limit=backend.config.pids_limit,
        mem_limit=64 * 1024**2,
        init=backend.config.init,
    )
    name = f"labgate-{backend.deployment}-doctor-{secrets.token_hex(3)}"
    container_id = ""
    try:
        created = api.create_container(
            image,
            entrypoint=["sh", "-c", "exit 0"],
            command=[],
            host_config=host,
            name=name,
            labels={"labgate.doctor": "true"},
        )
        container_id = str(created["Id"])
        api.start(container_id)
        code = api.wait(container_id, timeout=30).get("StatusCode")
    except Exception as exc:
        words = str(getattr(exc, "explanation", "") or exc)
        if any(text in words.lower() for text in NO_SHELL):
            return Diagnosis("ok", f"a throwaway container of {image} started (no sh in it)")
        return Diagnosis(
            "fail",
            f"a throwaway container of {image} did not start: {words.splitlines()[0]}",
            "check the engine's runtime settings (docs/backends/containers.md, e.g. runtime "
            "runc and cgroup_manager cgroupfs where crun fails; default_ulimits at or below "
            "`ulimit -Hn`)",
        )
    finally:
        if container_id:
            # A leftover would be labelled labgate.doctor.
            with contextlib.suppress(Exception):
                api.remove_container(container_id, force=True, v=True)
    if code not in (0, None):
        return Diagnosis("warn", f"a throwaway container of {image} exited with code {code}")
    return Diagnosis("ok", f"a throwaway container of {image} started and exited cleanly")
