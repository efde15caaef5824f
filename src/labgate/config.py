"""labgate's one settings class.

Every setting has a default and help text; ``labgate config show`` prints the
effective values and ``docs/configuration.md`` lists them all (a test keeps the
two in step). Values come, highest priority first, from keyword arguments,
``LABGATE_*`` environment variables, the TOML file named by ``LABGATE_CONFIG``
(or ``./labgate.toml`` when present), then the defaults below.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from labgate.configfile import config_file
from labgate.datadir import (
    DATASETS_DIR,
    KEY_FILE,
    check_key,
    check_key_file,
    create_key_file,
    prepare_data_dir,
)
from labgate.units import parse_size
from labgate.wire.stream import tunnel_address

# The common spellings, a subset of what ``limits`` accepts: checked without importing it,
# which keeps loading settings (every CLI command does) fast.
_SIMPLE_RATE_RE = re.compile(
    r"^\s*[0-9]+\s*(/|\s+per\s+)\s*([0-9]+\s*)?(second|minute|hour|day|month|year)s?\s*$",
    re.IGNORECASE,
)


def _rate_limit(value: object) -> object:
    """A rate in the ``limits`` notation (``10/5minutes``, ``30 per minute``), or empty."""
    if isinstance(value, str) and _SIMPLE_RATE_RE.match(value):
        return value.strip()
    if isinstance(value, str) and value.strip():
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a rate such as 10/5minutes or 30 per minute"
            ) from None
        return value.strip()
    return value


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network") from None


class SiteCapacity(BaseModel):
    """What a site may run at once; zero means unlimited."""

    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(0, ge=0, description="CPU cores in all.")
    memory: Annotated[int, BeforeValidator(lambda v: v if v in (0, "0") else parse_size(v))] = (
        Field(0, ge=0, description="Memory in all, e.g. 64G.")
    )
    max_instances: int = Field(0, ge=0, description="Instances at once.")
    starts: float | None = Field(
        None,
        ge=0,
        description=(
            "CPU cores given to starting tools at once (the start queue); unset: the "
            "site's cores; 0: no start queue (a backend that queues by itself, e.g. Slurm)."
        ),
    )


class SiteConfig(BaseModel):
    """One site: a backend with its options, capacity, labels and data root."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    backend: str = "process"
    options: dict[str, Any] = Field(default_factory=dict)
    capacity: SiteCapacity = Field(default_factory=SiteCapacity)
    labels: dict[str, str] = Field(default_factory=dict)
    data_root: Path | None = None
    #: Directory of shared read-write group volumes, <group_root>/<group> (operations.md).
    group_root: Path | None = None
    #: Whether /readyz fails while this site is down (else it only says so).
    required: bool = False


class PoolConfig(BaseModel):
    """A warm pool: ``size`` pre-started instances of ``tool`` on ``site``."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$", description="The tool to keep warm.")
    site: str = Field("", description="The site; empty means the first site.")
    size: int = Field(1, ge=0, le=1000, description="Instances kept started and unclaimed.")


class IdentityProviderConfig(BaseModel):
    """One identity provider: its kind (a ``labgate.identity`` plugin), options and policy."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$", description="Short name, in URLs.")
    kind: str = Field("local", description="The plugin: local, oidc, ldap, or an installed one.")
    label: str = Field("", max_length=100, description="Text of its sign-in button or form.")
    options: dict[str, Any] = Field(default_factory=dict, description="The plugin's options.")
    first_login: Literal["open", "domains", "existing"] = Field(
        "existing",
        description=(
            "Whom a first sign-in lets in: open (anyone the provider knows), domains (e-mail "
            "domains in allowed_domains), existing (only non-admin users an admin created, "
            "named exactly as the provider's user name)."
        ),
    )
    allowed_domains: list[str] = Field(
        default_factory=list, description="E-mail domains let in when first_login = domains."
    )
    group_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Provider group -> labgate group. Membership of the mapped labgate groups follows "
            "the provider at every sign-in."
        ),
    )
    admin_groups: list[str] = Field(
        default_factory=list,
        description="Provider groups whose members are labgate admins (set at every sign-in).",
    )

    @field_validator("allowed_domains")
    @classmethod
    def _lower_domains(cls, value: list[str]) -> list[str]:
        return [d.strip().lower().lstrip("@") for d in value if d.strip()]


class OAuthClientConfig(BaseModel):
    """A service that may ask labgate who its user is (labgate as an OpenID Connect provider)."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="The client's id.")
    client_secret: SecretStr = Field(description="Its secret (HTTP Basic or form post).")
    redirect_uris: list[str] = Field(min_length=1, description="Exact redirect URIs allowed.")
    name: str = Field("", max_length=100, description="What people are told they sign in to.")


NO_SECRET = SecretStr("")


@dataclass(frozen=True)
class SiteSettings:
    """What a backend may know of the settings: its own machine's, never the portal's secrets.

    In ``labgate serve`` they come from the portal's settings; under
    ``labgate agent`` from the site machine's own. A backend gets these, not
    :class:`Settings` (which holds the session key, the database URL and the
    admin password).
    """

    data_dir: Path
    snapshots_dir: Path
    sandbox: str = "auto"
    instance_uid_base: int = 1_000_000_000
    snapshot_registry: str = ""
    snapshot_registry_username: str = ""
    snapshot_registry_password: SecretStr = NO_SECRET

    @property
    def workspaces_dir(self) -> Path:
        """Where the site keeps users' workspaces."""
        return self.data_dir / "workspaces"

    @property
    def logs_dir(self) -> Path:
        """Where instances' output is captured."""
        return self.data_dir / "logs"


class Settings(BaseSettings):
    """Every knob of labgate, server and client side."""

    model_config = SettingsConfigDict(
        env_prefix="LABGATE_",
        extra="forbid",
        validate_default=True,
    )

    # --- where things live -------------------------------------------------
    data_dir: Path = Field(
        Path("./var"),
        description="Directory for the SQLite database, workspaces, logs and the secret key.",
    )
    database_url: str = Field(
        "",
        description=(
            "SQLAlchemy database URL. Empty means SQLite at <data_dir>/labgate.db. "
            "For PostgreSQL: postgresql+psycopg://user:pass@host/db."
        ),
    )

    # --- the public front door ---------------------------------------------
    host: str = Field("127.0.0.1", description="Address `labgate serve` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `labgate serve` listens on.")
    public_url: str = Field(
        "",
        description="URL users reach labgate at. Empty means http://<host>:<port>.",
    )
    instance_host: str = Field(
        "",
        description=(
            "Serve each instance on its own host name, e.g. {id}.apps.example.org (needs a "
            "wildcard DNS record and certificate). Empty means under /i/<id>/ on the portal's "
            "host."
        ),
    )
    share_on_portal_origin: bool = Field(
        False,
        description=(
            "Without instance_host, let admins and the people an instance is shared with open "
            "it in the browser with their portal session, under /i/<id>/ on the portal's own "
            "origin. Dangerous: the tool's pages then run as the visitor on the portal's "
            "origin and can act in their name (make the tool's owner an admin when an admin "
            "opens it). Off: only an instance's owner opens it there; others need "
            "instance_host (or an API token)."
        ),
    )
    router_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Router worker processes sharing the public port (SO_REUSEPORT).",
    )
    router_tunnel_url: str = Field(
        "",
        description=(
            "Where tunneled sites' agents dial this router (`labgate router`) for their data "
            "connections: http(s)://HOST[:PORT], reachable from the sites. Empty means its "
            "own listen address (host and port; the machine's name when host is a wildcard). "
            "`labgate serve` does not use it: agents dial the public URL."
        ),
    )

    # --- accounts and security ---------------------------------------------
    secret_key: SecretStr = Field(
        SecretStr(""),
        description=(
            "Key that signs session cookies (and seals instance secrets): at least 256 "
            "random bits, e.g. 43 URL-safe base64 characters. Empty means generate one "
            "and keep it in <data_dir>/secret_key (mode 0600, refused when looser)."
        ),
    )
    admin_username: str = Field("admin", description="Name of the admin created on first start.")
    admin_password: SecretStr = Field(
        SecretStr(""),
        description=(
            "Password of the admin created on first start. Empty means generate one and "
            "print it once."
        ),
    )
    session_max_age: int = Field(
        14 * 24 * 3600, ge=60, description="Lifetime of a browser session, in seconds."
    )
    cookie_secure: bool = Field(
        False,
        description=(
            "Mark cookies Secure. They always are when the public URL is https:// "
            "(labgate's own TLS, or a TLS-terminating proxy in front)."
        ),
    )
    max_request_body: int = Field(
        1024 * 1024, ge=1024, description="Largest API request body accepted, in bytes."
    )
    password_min_length: int = Field(
        8,
        ge=8,
        le=1024,
        description="Shortest password accepted when one is set (common ones are refused too).",
    )
    password_hash_workers: int = Field(
        0,
        ge=0,
        le=256,
        description=(
            "Threads that hash and check passwords; sign-ins beyond them wait their turn "
            "instead of taking threads from other work. 0 means one per CPU core."
        ),
    )
    login_limit_account_address: Annotated[str, BeforeValidator(_rate_limit)] = Field(
        "10/5minutes",
        description=(
            "Failed sign-ins allowed for one account from one client address (e.g. 10/5minutes); "
            "a successful sign-in starts the count again. Empty: no limit."
        ),
    )
    login_limit_account: Annotated[str, BeforeValidator(_rate_limit)] = Field(
        "50/15minutes",
        description=(
            "Failed sign-ins allowed for one account from all addresses together. Over it the "
            "account cannot sign in with a password until the window passes. Empty: no limit."
        ),
    )
    login_limit_address: Annotated[str, BeforeValidator(_rate_limit)] = Field(
        "30/minute",
        description=(
            "Failed sign-ins allowed from one client address, whatever the account. "
            "Empty: no limit."
        ),
    )
    identity_providers: list[IdentityProviderConfig] = Field(
        default_factory=list,
        description=(
            "How people sign in: [[identity_providers]] tables (name, kind = local, oidc or "
            "ldap, label, options, first_login, allowed_domains, group_map, admin_groups). "
            "Empty means local passwords only. In the environment: a JSON list."
        ),
    )
    oauth_clients: list[OAuthClientConfig] = Field(
        default_factory=list,
        description=(
            "Services that may sign their users in with labgate (labgate as an OpenID Connect "
            "provider): [[oauth_clients]] tables with client_id, client_secret, redirect_uris, "
            "name. They get an ID token with the user's name and groups. In the environment: a "
            "JSON list."
        ),
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses or networks (CIDR) of proxies in front of the router whose "
            "X-Forwarded-For the router believes; from anyone else it is dropped. "
            "`labgate portal` believes its routers' X-Forwarded-* only from these and "
            "loopback. In the environment: a JSON list."
        ),
    )
    tls_cert_file: Path | None = Field(
        None,
        description=(
            "PEM certificate (chain) the router serves HTTPS with; with tls_key_file. "
            "Reloaded when the file changes, without a restart."
        ),
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_reload_interval: float = Field(
        10.0, ge=0, description="Seconds between checks for a renewed certificate (0: never)."
    )
    http_redirect_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "With TLS: also listen for plain HTTP on this port (on host) and redirect every "
            "request to the https:// public URL. Empty: no plain-HTTP listener."
        ),
    )
    hsts_max_age: int = Field(
        31536000,
        ge=0,
        description=(
            "Strict-Transport-Security max-age, in seconds, sent when the public URL is "
            "https:// (0: no HSTS header)."
        ),
    )

    # --- tools and instances -----------------------------------------------
    tools_dir: Path | None = Field(
        None, description="Directory of extra tool definitions (*.toml) added to the built-ins."
    )
    max_instances_per_user: int = Field(
        5,
        ge=0,
        description="Instances one user may have pending, starting or running at once "
        "(batch task attempts under way count too).",
    )
    start_queue_fairness: Literal["user", "group"] = Field(
        "user",
        description=(
            "Whom a site's start queue serves in turn: each user, or each group charged "
            "(round robin, then first come first served)."
        ),
    )
    site_name: str = Field(
        "local", description="Name of the all-in-one local site (used when `sites` is empty)."
    )
    sites: list[SiteConfig] = Field(
        default_factory=list,
        description=(
            "Sites of this labgate: name, backend, options, capacity, labels, data_root. "
            "Empty means one local site using the process backend, with data root "
            "<data_dir>/datasets. In TOML: [[sites]] tables; "
            "in the environment: a JSON list."
        ),
    )
    sandbox: Literal["auto", "bwrap", "none"] = Field(
        "auto",
        description=(
            "Process backend sandbox: bwrap (required), none, or auto (bwrap when installed; "
            "otherwise none with a warning, or, when labgate runs as root, launches refused)."
        ),
    )
    instance_uid_base: int = Field(
        1_000_000_000,
        ge=65536,
        le=4_000_000_000,
        description=(
            "Process backend, labgate running as root: instances run as uid and gid "
            "instance_uid_base + the owner's user id, with no capabilities. Pick a range no "
            "account and no /etc/subuid or /etc/subgid range uses."
        ),
    )
    stop_grace_seconds: float = Field(
        10.0, ge=0, description="Seconds between TERM and KILL when stopping an instance."
    )
    poll_interval: float = Field(
        2.0, gt=0, description="Seconds between checks that running instances are still alive."
    )
    log_tail_lines: int = Field(
        40, ge=0, le=10000, description="Log lines attached to a failed launch's event."
    )

    # --- network sites and their agents ---------------------------------------
    site_heartbeat_interval: float = Field(
        10.0,
        gt=0,
        le=300,
        description=(
            "Seconds between heartbeats on a network site's agent connection, both ways; "
            "a connection silent for three of them is closed and the agent reconnects."
        ),
    )
    site_command_timeout: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds the portal waits for a network site's agent to answer a command "
            "(stops get twice this, snapshots sixty times) before it gives up with a 503."
        ),
    )
    site_grace_period: float = Field(
        300.0,
        ge=0,
        description=(
            "Seconds the instances of a disconnected network site stay `unreachable` before "
            "the ones its agent does not report back are `lost`; its batch task attempts "
            "are lost (and retried) past it too."
        ),
    )
    site_reconnect_window: float = Field(
        30.0,
        ge=0,
        description=(
            "Seconds after a portal start that a network site's instances keep their state "
            "(and their routes) while its agent reconnects; a site still away after it is "
            "disconnected: its instances become `unreachable`."
        ),
    )
    agent_portal: str = Field(
        "",
        description=(
            "`labgate agent`: the portal's public address, e.g. https://gateway.example "
            "(the agent dials out to it; nothing listens on the site)."
        ),
    )
    agent_token: SecretStr = Field(
        SecretStr(""),
        description="`labgate agent`: the site's token, from `labgate site add` or `site token`.",
    )
    agent_reconnect_max: float = Field(
        30.0,
        gt=0,
        description=(
            "`labgate agent`: the longest pause, in seconds, between reconnect attempts "
            "(pauses grow from half a second with random jitter)."
        ),
    )

    # --- datasets ----------------------------------------------------------
    site_report_ttl: int = Field(
        86400,
        ge=0,
        description=(
            "Seconds a site's inventory push stays valid when the push names no TTL; after "
            "that the site's replicas are stale and not used for placement. 0: never stale."
        ),
    )
    dataset_fetch_max_bytes: Annotated[
        int, BeforeValidator(lambda v: v if v in (0, "0") else parse_size(v))
    ] = Field(
        1024**3,
        ge=0,
        description=(
            "Largest URL dataset fetched into a site's cache when no live replica exists "
            "(bytes or e.g. 2G; 0 turns fetching off)."
        ),
    )
    dataset_fetch_private_networks: bool = Field(
        False,
        description=(
            "Allow fetching URL datasets from loopback, private and link-local addresses "
            "(off: a registered URL cannot make the server fetch from its own network)."
        ),
    )

    # --- snapshots and reconcile --------------------------------------------
    snapshot_registry: str = Field(
        "",
        description=(
            "OCI registry that container snapshots are pushed to: [http://]host[:port][/path], "
            "e.g. http://127.0.0.1:5000/labgate (http:// for a plain-HTTP registry). Empty "
            "means snapshot images stay on the engine that took them."
        ),
    )
    snapshot_registry_username: str = Field(
        "", description="User name for the snapshot registry (empty: no credentials)."
    )
    snapshot_registry_password: SecretStr = Field(
        SecretStr(""), description="Password or token for the snapshot registry."
    )
    snapshot_storage_per_user: Annotated[
        int, BeforeValidator(lambda v: v if v in (0, "0") else parse_size(v))
    ] = Field(
        0,
        ge=0,
        description="Bytes of snapshots one user may keep (e.g. 20G); at or above it, new "
        "snapshots are refused (429). 0: no limit.",
    )
    snapshot_dir: Path | None = Field(
        None,
        description=(
            "Directory of workspace-archive snapshots (process backend). Empty means "
            "<data_dir>/snapshots."
        ),
    )
    run_tasks_per_site: int = Field(
        8,
        ge=1,
        le=10_000,
        description=(
            "Batch runs: at most this many task attempts at once on one site; "
            "the other tasks of a stage wait their turn."
        ),
    )
    reconcile_interval: float = Field(
        60.0,
        ge=0,
        description=(
            "Seconds between reconciles: sites stop the instances labgate does not know "
            "(containers, processes, Slurm jobs). 0 means only at start-up."
        ),
    )

    leader_lease_seconds: float = Field(
        5.0,
        ge=0.5,
        le=300,
        description=(
            "`labgate portal` replicas: seconds a replica's lease on the leadership lasts "
            "(renewed every third of it). When the leader dies, another replica runs culling, "
            "warm pools, reconciles and the runs' sweep within about this time."
        ),
    )
    replica_id: str = Field(
        "",
        max_length=200,
        description=(
            "This portal process's name in /readyz, /metrics and the leader lease. "
            "Empty means <hostname>:<pid>. Give every replica its own."
        ),
    )

    # --- lifecycle: warm pools, culling, quotas, metrics --------------------
    pools: list[PoolConfig] = Field(
        default_factory=list,
        description=(
            "Warm pools: [{tool, site, size}] instances started ahead of time and handed to "
            "the next matching launch. In TOML: [[pools]] tables; in the environment: a JSON list."
        ),
    )
    pool_check_interval: float = Field(
        10.0, gt=0, description="Seconds between checks that every warm pool is full."
    )
    cull_interval: float = Field(
        30.0, ge=0, description="Seconds between idle and lifetime checks; 0 turns culling off."
    )
    cull_warning: float = Field(
        600.0,
        ge=0,
        description="Seconds before an idle or lifetime stop that a warning goes into the events.",
    )
    keep_alive_max: float = Field(
        86400.0, ge=0, description="Longest a user may keep an idle instance alive, in seconds."
    )
    max_lifetime: float = Field(
        0.0,
        ge=0,
        description="Seconds any instance may run before it is stopped; 0 means no limit.",
    )
    max_cpu_per_user: float = Field(
        0.0, ge=0, description="CPU cores one user may hold at once; 0 means no limit."
    )
    max_memory_per_user: Annotated[
        int, BeforeValidator(lambda v: v if v in (0, "0") else parse_size(v))
    ] = Field(0, ge=0, description="Memory one user may hold at once (e.g. 16G); 0: no limit.")
    max_core_hours_per_user: float = Field(
        0.0, ge=0, description="Core-hours one user may use per calendar month; 0: no limit."
    )
    metrics_token: SecretStr = Field(
        SecretStr(""),
        description=(
            "Bearer token that may read /metrics (besides admin API tokens). Empty means "
            "only admin tokens."
        ),
    )

    # --- the client (CLI) --------------------------------------------------
    url: str = Field(
        "",
        description=(
            "Server URL the CLI talks to. Empty means the one saved by `labgate login`, "
            "else http://127.0.0.1:8000."
        ),
    )
    token: SecretStr = Field(
        SecretStr(""),
        description="API token the CLI uses. Empty means the one saved by `labgate login`.",
    )

    @field_validator("public_url", "url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("router_tunnel_url")
    @classmethod
    def _check_tunnel_url(cls, value: str) -> str:
        return tunnel_address(value) if value.strip() else ""

    @field_validator("instance_host")
    @classmethod
    def _check_instance_host(cls, value: str) -> str:
        value = value.strip().lower()
        if not value:
            return ""
        # {id} is the whole first label: a wildcard DNS record, a wildcard certificate and
        # a CSP source (*.apps.example.org) each cover exactly that.
        if (
            not value.startswith("{id}.")
            or value.count("{id}") != 1
            or any(c in value for c in "/@?#[] *")
        ):
            raise ValueError(
                "instance_host is a host name whose first label is {id}, e.g. {id}.apps.example.org"
            )
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            raise ValueError(f"instance_host has a bad port: {value!r}")
        if "{" in name.replace("{id}", "") or "}" in name.replace("{id}", ""):
            raise ValueError(f"instance_host holds a brace other than {{id}}: {value!r}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [_network(item) for item in value]

    @model_validator(mode="after")
    def _admin_password_policy(self) -> Settings:
        password = self.admin_password.get_secret_value()
        if password:
            from labgate.errors import Unprocessable
            from labgate.passwords import check_new_password

            try:
                check_new_password(password, self.admin_username, self.password_min_length)
            except Unprocessable as exc:
                raise ValueError(f"admin_password: {exc.detail}") from None
        return self

    @model_validator(mode="after")
    def _portal_is_no_instance_host(self) -> Settings:
        if self.instance_host:
            portal = (urlsplit(self.effective_public_url).hostname or "").lower()
            suffix = self.instance_host.split(":")[0].removeprefix("{id}")
            label = portal.removesuffix(suffix)
            if portal.endswith(suffix) and label and "." not in label:
                raise ValueError(
                    f"instance_host {self.instance_host!r} would take the portal's own host "
                    f"{portal!r} for an instance: put the instances under another domain"
                )
        return self

    @model_validator(mode="after")
    def _unique_sites(self) -> Settings:
        names = [site.name for site in self.sites]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"site names must be unique: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _unique_providers(self) -> Settings:
        names = [provider.name for provider in self.identity_providers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"identity provider names must be unique: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.http_redirect_port is not None and self.tls_cert_file is None:
            raise ValueError("http_redirect_port needs TLS (tls_cert_file and tls_key_file)")
        return self

    @property
    def serves_tls(self) -> bool:
        """Whether the router terminates TLS itself."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def effective_cookie_secure(self) -> bool:
        """Whether cookies are ``Secure``: asked for, or the public URL is https://."""
        return self.cookie_secure or self.effective_public_url.startswith("https://")

    @property
    def effective_sites(self) -> list[SiteConfig]:
        """The configured sites, or the one local process site.

        The local site's data root is ``<data_dir>/datasets``, so datasets work out
        of the box (``make run``): replicas are directories under it.
        """
        if self.sites:
            return self.sites
        root = (self.data_dir / DATASETS_DIR).resolve()
        return [SiteConfig(name=self.site_name, backend="process", data_root=root)]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the environment, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived values ----------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        """The database URL, SQLite under the data dir when none is set."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'labgate.db').resolve()}"

    def instance_netloc(self, instance_id: str) -> str:
        """The host (and port) an instance is served on when ``instance_host`` is set.

        Without a port in the template, the public URL's port (when it names
        one) is added: the instance hosts are served by the same router.
        """
        netloc = self.instance_host.replace("{id}", instance_id)
        if ":" not in netloc:
            port = urlsplit(self.effective_public_url).port
            if port is not None:
                netloc = f"{netloc}:{port}"
        return netloc

    def instance_url(self, instance_id: str) -> str:
        """Where users open an instance: its own host, or ``/i/<id>/`` on the portal's."""
        if not self.instance_host:
            return f"{self.effective_public_url}/i/{instance_id}/"
        scheme = urlsplit(self.effective_public_url).scheme or "http"
        return f"{scheme}://{self.instance_netloc(instance_id)}/"

    @property
    def effective_public_url(self) -> str:
        """The URL users reach labgate at."""
        if self.public_url:
            return self.public_url
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.serves_tls else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def workspaces_dir(self) -> Path:
        """Where the process backend keeps users' workspaces."""
        return self.data_dir / "workspaces"

    @property
    def logs_dir(self) -> Path:
        """Where instances' output is captured."""
        return self.data_dir / "logs"

    @property
    def snapshots_dir(self) -> Path:
        """Where workspace-archive snapshots are stored."""
        return self.snapshot_dir if self.snapshot_dir is not None else self.data_dir / "snapshots"

    def site_settings(self) -> SiteSettings:
        """The part of these settings a site's backend sees."""
        return SiteSettings(
            data_dir=self.data_dir,
            snapshots_dir=self.snapshots_dir,
            sandbox=self.sandbox,
            instance_uid_base=self.instance_uid_base,
            snapshot_registry=self.snapshot_registry,
            snapshot_registry_username=self.snapshot_registry_username,
            snapshot_registry_password=self.snapshot_registry_password,
        )

    def signing_key(self) -> str:
        """The session signing key, generated and stored on first use when unset.

        Refused (:class:`labgate.datadir.UnsafeSetup`) when it is weak, or when
        its file is empty, not the server user's or readable by others.
        """
        configured = self.secret_key.get_secret_value()
        if configured:
            return check_key(configured, "the secret_key setting")
        path = self.data_dir / KEY_FILE
        if path.exists():
            return check_key_file(path)
        prepare_data_dir(self.data_dir)
        return create_key_file(path)

    def public_view(self) -> dict[str, Any]:
        """Effective settings as plain values, secrets masked."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, list):
                value = [
                    v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value
                ]
            out[name] = value
        return out
