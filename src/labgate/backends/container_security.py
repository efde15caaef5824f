"""What a container of the containers backend may do: capabilities, user, user namespace.

The rules (``docs/backends/containers.md``, *What is isolated*):

- **Capabilities**: every container starts with none (``cap_drop`` must hold
  ``ALL``); ``cap_add`` may give back only the few that switch users or own
  files (:data:`ALLOWED_CAPS`), never one that reaches past the container
  (``SYS_ADMIN``, ``SYS_PTRACE``, ``DAC_READ_SEARCH``, ``NET_ADMIN``...).
- **no-new-privileges** is always set; security options that switch off a
  confinement (``seccomp=unconfined``, ``label=disable``...) are refused.
- **User**: the tool file's ``user``; else the image's ``USER`` unless that
  is root; else the site's ``default_user`` (a numeric ``uid:gid``).
- **User namespace** (rootful Podman): each user's containers get their own
  range of host ids, recorded on their workspace volume (label
  :data:`LABEL_USERNS`), so uid 0 inside is no account on the host and the
  volume's files keep one owner across the user's instances.

This module holds the checks and the arithmetic; ``containers.py`` applies
them to the Docker Engine API calls.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Capabilities ``cap_add`` may give back: those an entry point needs to switch to
#: another user or fix file ownership. Each acts inside the container's own user
#: namespace and files only; none reaches the host's kernel, devices or processes.
ALLOWED_CAPS = frozenset(
    {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID"}
)
#: Security options that undo a confinement: refused in ``security_opt``.
UNSAFE_SECURITY_OPT = re.compile(
    r"unconfined|^label[=:]disable$|^no-new-privileges[=:]false$|^systempaths[=:]unconfined$",
    re.IGNORECASE,
)
NO_NEW_PRIVILEGES = "no-new-privileges"
#: Label of a workspace volume: ``<first host id>:<count>``, its owner's id range.
LABEL_USERNS = "labgate.userns"
#: ``0:<first host id>:<count>``, one mapping for every container of a site.
MAPPING_RE = re.compile(r"^0:(\d+):(\d+)$")
RANGE_RE = re.compile(r"^(\d+):(\d+)$")
USER_RE = re.compile(r"^(\d+)(?::(\d+))?$")
MAX_ID = 2**32 - 1
#: Where engines keep their API sockets and storage: never mounted into a container.
ENGINE_PATHS = (
    "/run/podman",
    "/var/run/podman",
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd",
    "/var/run/containerd",
    "/var/lib/containers",
    "/var/lib/docker",
    "/run/containers",
)


def check_cap_drop(value: list[str]) -> list[str]:
    """``cap_drop`` must drop everything: what a tool needs comes back through ``cap_add``."""
    if "ALL" not in {cap.upper() for cap in value}:
        raise ValueError(
            'cap_drop must contain "ALL": containers start with no capabilities '
            "(give back what a tool needs with cap_add)"
        )
    return value


def check_cap_add(value: list[str]) -> list[str]:
    """``cap_add`` holds only capabilities of :data:`ALLOWED_CAPS`."""
    names = [cap.upper().removeprefix("CAP_") for cap in value]
    refused = sorted(set(names) - ALLOWED_CAPS)
    if refused:
        raise ValueError(
            f"cap_add may not give {', '.join(refused)}: only {', '.join(sorted(ALLOWED_CAPS))} "
            "(they act on the container's own files and users, not on the host)"
        )
    return names


def check_security_opt(value: list[str]) -> list[str]:
    """No option that switches a confinement off; ``no-new-privileges`` is added anyway."""
    for option in value:
        if UNSAFE_SECURITY_OPT.search(option.strip()):
            raise ValueError(f"security_opt {option!r} would switch a confinement off")
    return value


def security_options(configured: Iterable[str]) -> list[str]:
    """The site's security options, with ``no-new-privileges`` always among them."""
    options = list(configured)
    if not any(opt.split("=")[0].split(":")[0] == NO_NEW_PRIVILEGES for opt in options):
        options.append(NO_NEW_PRIVILEGES)
    return options


def check_user(value: str) -> str:
    """``default_user`` is a numeric ``uid[:gid]`` that is not root."""
    match = USER_RE.match(value)
    if match is None or int(match.group(1)) == 0 or int(match.group(1)) > MAX_ID:
        raise ValueError(f"default_user must be a numeric uid[:gid] other than 0, not {value!r}")
    return value


def check_userns(value: str) -> str:
    """``auto``, ``host`` or ``0:<first host id>:<count>``."""
    if value in ("auto", "host"):
        return value
    match = MAPPING_RE.match(value)
    if match is None or int(match.group(1)) == 0 or not 0 < int(match.group(2)) <= MAX_ID:
        raise ValueError(
            f"userns must be 'auto', 'host' or '0:<first host id>:<count>' (not host "
            f"id 0), not {value!r}"
        )
    return value


def check_range(value: str) -> str:
    """``userns_range``: ``<first host id>:<count>``, not reaching host id 0 or past 2^32."""
    match = RANGE_RE.match(value)
    if match is None:
        raise ValueError(f"userns_range must be '<first host id>:<count>', not {value!r}")
    start, count = int(match.group(1)), int(match.group(2))
    if start == 0 or count == 0 or start + count - 1 > MAX_ID:
        raise ValueError(f"userns_range {value!r} must start above 0 and end at 2^32-1 at most")
    return value


def is_root(user: str) -> bool:
    """Whether a ``USER`` value (name or id, with or without group) means root."""
    name = user.split(":", 1)[0].strip()
    return name in ("", "root", "0")


def run_user(tool_user: str, image_user: str, default_user: str) -> str:
    """Who the container runs as: the tool's user, the image's unless root, else the default."""
    if tool_user:
        return tool_user
    if not is_root(image_user):
        return image_user
    return default_user


def numeric_ids(user: str) -> tuple[int, int] | None:
    """``(uid, gid)`` of a numeric ``uid[:gid]`` (gid defaults to uid); None for names."""
    match = USER_RE.match(user)
    if match is None:
        return None
    uid = int(match.group(1))
    return uid, int(match.group(2) or uid)


@dataclass(frozen=True)
class IdRange:
    """Host ids ``start .. start + count - 1``, mapped to 0 .. count - 1 in a container."""

    start: int
    count: int

    @classmethod
    def parse(cls, text: str) -> IdRange | None:
        """``<start>:<count>``, or None when ``text`` is not that."""
        match = RANGE_RE.match(text.strip())
        if match is None:
            return None
        return cls(int(match.group(1)), int(match.group(2)))

    def label(self) -> str:
        """The form kept in :data:`LABEL_USERNS`."""
        return f"{self.start}:{self.count}"

    def userns_mode(self) -> str:
        """Podman's ``UsernsMode``: an automatic namespace forced to exactly this range."""
        mapping = f"0:{self.start}:{self.count}"
        return f"auto:uidmapping={mapping},gidmapping={mapping}"

    def host_id(self, inside: int) -> int:
        """The host id of id ``inside`` of the container."""
        return self.start + inside


def allocate(pool: IdRange, size: int, taken: Iterable[IdRange]) -> IdRange:
    """The highest free ``size``-wide block of ``pool``.

    Counted from the top: Podman's own ``--userns=auto`` hands out the same
    pool from the bottom, so the two meet as late as possible.
    """
    used = [(r.start, r.start + r.count) for r in taken]
    start = pool.start + pool.count - size
    while start >= pool.start:
        end = start + size
        clash = [lo for lo, hi in used if lo < end and start < hi]
        if not clash:
            return IdRange(start, size)
        start = min(clash) - size
    raise ValueError(
        f"userns_range {pool.label()} has no free block of {size} ids left: "
        "widen it (and /etc/subuid, /etc/subgid) or remove departed users' volumes"
    )


def engine_kind(version: dict[str, Any], info: dict[str, Any]) -> str:
    """``podman``, ``podman-rootless``, ``docker`` or ``docker-userns`` (daemon-wide remap)."""
    components = {str(c.get("Name", "")) for c in version.get("Components") or []}
    options = " ".join(str(o) for o in info.get("SecurityOptions") or [])
    if any("Podman" in name for name in components):
        rootless = bool(info.get("Rootless")) or "rootless" in options
        return "podman-rootless" if rootless else "podman"
    return "docker-userns" if "name=userns" in options else "docker"


def unix_socket_path(base_url: str) -> Path | None:
    """The socket file of a ``unix://`` engine URL."""
    for prefix in ("unix://", "http+unix://"):
        if base_url.startswith(prefix):
            return Path(base_url.removeprefix(prefix))
    return None


def engine_mount(source: Path, base_url: str) -> str | None:
    """The engine path a mount source would expose (contains or lies in), or None."""
    socket = unix_socket_path(base_url)
    guarded = [Path(p) for p in ENGINE_PATHS] + ([socket] if socket else [])
    resolved = source.resolve()
    for path in guarded:
        real = path.resolve()
        if resolved == real or resolved in real.parents or real in resolved.parents:
            return str(path)
    return None


#: The least CPU limit a container gets, in the engine's nanocpus: 0 would mean none.
MIN_NANO_CPUS = 10_000_000


def nano_cpus(cpu: float) -> int:
    """A CPU limit (cores) in the engine's nanocpus, never below :data:`MIN_NANO_CPUS`.

    The engine (and docker-py, which leaves a 0 out) reads 0 as "no limit":
    a request of a billionth of a core would otherwise get every core.
    """
    return max(int(cpu * 1e9), MIN_NANO_CPUS)
