"""``labgate doctor``: check this machine's labgate and say what to fix.

It runs where the server runs, with the same settings (environment,
``labgate.toml``), and checks, in order: the settings themselves, the data
directory, the database and its schema, the tool catalog, every site's
backend and its engine (each backend's own ``doctor()`` checks: bubblewrap for
processes; for containers the Docker Engine API, the snapshot registry and
whether the engine trusts it, every tool's image, and a throwaway container
with the site's confinement), the warm pools, the identity providers (OpenID
Connect discovery, the LDAP server's port), whether the router's hot path is
compiled, and, when a
server answers at the configured URL, its ``/readyz``. Each check is one
:class:`Finding`: ``ok``, ``warn`` (works, but probably not as meant) or
``fail`` (will not work), with the fix in words. ``doctor`` exits 1 when anything failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from labgate.backends.base import Backend, Diagnosis, load_backend
from labgate.backends.registry import load_catalog
from labgate.config import Settings
from labgate.datadir import UnsafeSetup, prepare_data_dir
from labgate.db.session import Database, alembic_config
from labgate.errors import ConfigError
from labgate.identity.base import load_providers
from labgate.identity.ldap import LDAP
from labgate.identity.oidc import OpenIDConnect
from labgate.startup import check_data_dir as check_data_dir_usable
from labgate.tools.catalog import Tool
from labgate.tools.ports import redirected_ports, tool_port_range

ENGINE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    level: str  # ok, info (nothing wrong: e.g. a tool this site does not have), warn, fail
    subject: str
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        """Plain JSON form."""
        return {
            "level": self.level,
            "subject": self.subject,
            "detail": self.detail,
            "fix": self.fix,
        }


def ok(subject: str, detail: str) -> Finding:
    """A check that passed."""
    return Finding("ok", subject, detail)


def check_data_dir(settings: Settings) -> Iterator[Finding]:
    """The data directory exists (or can be made), is writable and private, and the key is sound."""
    path = settings.data_dir.resolve()
    try:
        check_data_dir_usable(settings)  # the check `labgate serve` refuses to start on
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except (ConfigError, OSError) as exc:
        if isinstance(exc, ConfigError):
            problem = "; ".join(exc.problems)
        else:
            problem = f"{path} is not writable: {exc.strerror or exc}"
        yield Finding(
            "fail",
            "data_dir",
            problem,
            "create it, or set data_dir (LABGATE_DATA_DIR) to a writable directory",
        )
        return
    yield ok("data_dir", str(path))
    try:
        prepare_data_dir(path)
        settings.signing_key()
    except UnsafeSetup as exc:
        yield Finding("fail", "data_dir", str(exc), "serve refuses to start until it is fixed")
    free = shutil.disk_usage(path).free
    if free < 1024**3:
        yield Finding(
            "warn",
            "data_dir",
            f"only {free / 1024**2:.0f} MiB free",
            "free some space: workspaces, logs and the database live here",
        )


def check_database(settings: Settings) -> Iterator[Finding]:
    """The database answers and its schema is up to date."""
    url = settings.effective_database_url
    shown = url.split("@")[-1] if "@" in url else url
    try:
        db = Database(url)
    except Exception as exc:  # a bad URL or a missing driver
        yield Finding(
            "fail", "database", f"{shown}: {exc}", "fix database_url (LABGATE_DATABASE_URL)"
        )
        return
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            current = set(MigrationContext.configure(conn).get_current_heads())
        heads = set(ScriptDirectory.from_config(alembic_config(db.engine)).get_heads())
    except Exception as exc:
        yield Finding(
            "fail",
            "database",
            f"{shown}: {exc.__class__.__name__}: {exc}".splitlines()[0],
            "start the database server, or fix database_url (LABGATE_DATABASE_URL)",
        )
        return
    finally:
        db.dispose()
    if not current:
        yield Finding("warn", "database", f"{shown}: empty", "`labgate serve` creates the schema")
    elif current != heads:
        yield Finding(
            "warn",
            "database",
            f"{shown}: schema at {sorted(current)}, code expects {sorted(heads)}",
            "`labgate serve` applies the migrations on start",
        )
    else:
        yield ok("database", f"{shown} (schema up to date)")


def check_catalog(settings: Settings) -> Iterator[Finding]:
    """Every tool file loads."""
    catalog = load_catalog(settings.tools_dir)
    yield ok("tools", f"{len(catalog)} tools: {', '.join(t.name for t in catalog)}")
    for problem in catalog.problems:
        yield Finding(
            "warn", "tools", f"{problem.file}: {problem.reason}", "fix or remove the tool file"
        )


def check_sites(settings: Settings) -> Iterator[Finding]:
    """Every site's backend loads, its engine is sound (the backend's own checks), its tools run."""
    catalog = load_catalog(settings.tools_dir)
    for site in settings.effective_sites:
        subject = f"site {site.name}"
        try:
            backend = load_backend(site.backend)(settings, site.options)
            backend.attach(site.name)
        except Exception as exc:  # unknown backend, bad options
            detail = getattr(exc, "detail", None) or str(exc)
            yield Finding(
                "fail", subject, f"backend {site.backend!r}: {detail}", "fix the site's backend"
            )
            continue
        diagnoses = _diagnoses(backend)
        for diagnosis in diagnoses:
            yield Finding(diagnosis.level, subject, diagnosis.detail, diagnosis.fix)
        if any(diagnosis.final for diagnosis in diagnoses):
            continue
        reasons = {t.name: backend.unavailable_reason(t) for t in catalog}
        tools = [t for t in catalog if reasons[t.name] is None]
        runnable = [t.name for t in tools]
        if not runnable:
            yield Finding(
                "warn", subject, "no tool can run here", "install the tools' requirements"
            )
        else:
            yield ok(subject, f"{backend.name} backend; runs {', '.join(runnable)}")
        for diagnosis in _diagnoses(backend, tools):
            yield Finding(diagnosis.level, subject, diagnosis.detail, diagnosis.fix)
        for name, reason in reasons.items():
            if reason is not None:
                # Not a problem: the site runs what it has; the reason says what to install.
                yield Finding("info", f"tool {name}@{site.name}", f"cannot run here: {reason}")
        if site.data_root is not None and not site.data_root.is_dir():
            yield Finding(
                "warn",
                subject,
                f"data_root {site.data_root} is not a directory",
                "create it or fix data_root",
            )


def _diagnoses(backend: Backend, tools: list[Tool] | None = None) -> list[Diagnosis]:
    """What the backend says about its engine (and, with ``tools``, their images...).

    A hook that breaks is a finding too.
    """
    try:
        return backend.doctor() if tools is None else backend.doctor_tools(tools)
    except Exception as exc:
        problem = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        return [Diagnosis("fail", f"the {backend.name} backend's checks failed: {problem}")]


def check_pools(settings: Settings) -> Iterator[Finding]:
    """Every warm pool names a known tool and site whose backend can hand instances over."""
    if not settings.pools:
        return
    catalog = load_catalog(settings.tools_dir)
    sites = {s.name: s for s in settings.effective_sites}
    for pool in settings.pools:
        site_name = pool.site or settings.effective_sites[0].name
        subject = f"pool {pool.tool}@{site_name}"
        tool = catalog.get(pool.tool)
        site = sites.get(site_name)
        if tool is None or site is None:
            what = f"no tool {pool.tool!r}" if tool is None else f"no site {site_name!r}"
            yield Finding("fail", subject, what, "fix the pool in the pools setting")
            continue
        try:
            backend = load_backend(site.backend)(settings, site.options)
        except Exception:  # noqa: S112 - reported with the site
            continue
        reason = backend.unavailable_reason(tool) or backend.claim_support(tool)
        if reason is not None:
            yield Finding(
                "warn",
                subject,
                f"not kept, launches start cold: {reason}",
                "see docs/operations.md#warm-pools",
            )
        else:
            yield ok(subject, f"{pool.size} warm instance(s)")


def check_identity(settings: Settings) -> Iterator[Finding]:
    """Every identity provider loads, and the remote ones answer (OIDC discovery, LDAP port)."""
    try:
        providers = load_providers(settings.identity_providers)
    except ConfigError as exc:
        yield Finding("fail", "identity providers", str(exc), "see docs/identity.md")
        return
    for provider in providers.values():
        subject = f"identity provider {provider.name}"
        if isinstance(provider, OpenIDConnect):
            url = f"{provider.issuer}/.well-known/openid-configuration"
            try:
                response = httpx.get(url, timeout=ENGINE_TIMEOUT)
                issuer = str(response.json().get("issuer", "")).rstrip("/")
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                yield Finding("fail", subject, f"{url}: {exc}", "check the issuer option")
                continue
            if issuer != provider.issuer:
                yield Finding(
                    "fail", subject, f"discovery names issuer {issuer!r}", "fix the issuer option"
                )
            else:
                yield ok(subject, f"OpenID Connect at {provider.issuer}")
        elif isinstance(provider, LDAP):
            host, port = provider.server.host, provider.server.port
            try:
                socket.create_connection((host, port), timeout=ENGINE_TIMEOUT).close()
            except OSError as exc:
                yield Finding("fail", subject, f"{host}:{port}: {exc}", "check the url option")
                continue
            yield ok(subject, f"LDAP at {host}:{port} answers")
        else:
            yield ok(subject, f"{type(provider).__name__} ({provider.kind})")


def check_server(settings: Settings) -> Iterator[Finding]:
    """A server at the configured URL is ready (not running is fine: it is a note)."""
    url = settings.effective_public_url
    try:
        response = httpx.get(f"{url}/readyz", timeout=ENGINE_TIMEOUT)
    except httpx.HTTPError:
        yield ok("server", f"not running at {url} (start it with `labgate serve`)")
        return
    body: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        body = response.json()
    if response.status_code == 200:
        yield ok("server", f"ready at {url}")
    elif response.status_code == 503:
        failing = {k: v for k, v in (body.get("checks") or {}).items() if v != "ok"}
        yield Finding(
            "fail", "server", f"not ready at {url}: {failing}", "see the server's log on stderr"
        )
    else:
        yield Finding(
            "warn",
            "server",
            f"{url}/readyz answered {response.status_code}: not this labgate?",
            "check public_url, host and port",
        )


def check_tool_ports(settings: Settings) -> Iterator[Finding]:
    """No firewall rule takes the loopback ports tools are given (stale NAT rules)."""
    ports = tool_port_range()
    if not ports:
        return
    scan = redirected_ports(ports=ports)
    span = f"{ports.start}-{ports.stop - 1}"
    probed = "" if scan.probed == scan.total else f" ({scan.probed:,} of them probed in time)"
    if not scan.redirected:
        yield ok("tool ports", f"no port of {span} is redirected elsewhere{probed}")
        return
    shown = ", ".join(str(port) for port in scan.redirected[:10])
    more = f" and {len(scan.redirected) - 10} more" if len(scan.redirected) > 10 else ""
    yield Finding(
        "warn",
        "tool ports",
        f"{len(scan.redirected)} port(s) of {span} bind but a connection to them goes "
        f"elsewhere: {shown}{more}{probed}; labgate gives them to no tool",
        "a firewall (NAT) rule takes them, often one Podman left behind: "
        "see docs/backends/containers.md to find and clear them",
    )


def check_router(settings: Settings) -> Iterator[Finding]:
    """Whether the router runs its compiled hot path (mypyc) or its Python sources."""
    from labgate.router import _native

    state = _native.check()
    if state == "compiled":
        yield ok("router", "the per-request path is compiled (mypyc)")
    else:
        fix = "make compile (needs the dev extras' mypy and a C compiler); it works either way"
        yield Finding("info", "router", f"runs {state}", fix)


def run_checks(settings: Settings) -> list[Finding]:
    """Every check, in order."""
    findings: list[Finding] = []
    if settings.pools and os.geteuid() != 0:
        findings.append(
            Finding(
                "warn",
                "user",
                f"running as uid {os.geteuid()}, not root",
                "warm pools of the process backend need root (mounts into the sandbox)",
            )
        )
    for check in (
        check_data_dir,
        check_database,
        check_catalog,
        check_sites,
        check_pools,
        check_identity,
        check_tool_ports,
        check_router,
        check_server,
    ):
        findings.extend(check(settings))
    return findings
