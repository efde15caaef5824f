"""The portal application: FastAPI app factory and its start-up and shut-down.

On start it migrates the database, creates the first admin (printing a
generated password once), loads the tool catalog, brings up the local site
and re-attaches to every instance that was running before. On shut-down it
stops watching but leaves instances running: restarting labgate interrupts
no one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate import __version__
from labgate.agent.daemon import build_site_agent
from labgate.agent.link import LocalSiteLink
from labgate.backends.registry import load_catalog
from labgate.config import Settings, SiteConfig
from labgate.datadir import prepare_data_dir
from labgate.db.models import Site, SiteKind
from labgate.db.sealing import seal_plain_secrets
from labgate.db.session import open_database
from labgate.errors import ConfigError
from labgate.portal import apidocs, health, oauth, operations
from labgate.portal.accounts import bootstrap_admin, generate_password, no_users
from labgate.portal.api import (
    agent,
    auth,
    catalog,
    datasets,
    groups,
    instances,
    lifecycle,
    resolve,
    runs,
    shares,
    sites,
    snapshots,
    task_gateway,
    tokens,
    usage,
    users,
)
from labgate.portal.api import router as router_api
from labgate.portal.errors import BodyLimitMiddleware, install_error_handlers
from labgate.portal.hsts import HstsMiddleware, NoStoreMiddleware
from labgate.portal.openapi import install_openapi
from labgate.portal.replicas import Replicas
from labgate.portal.routefeed import RouteFeedHub
from labgate.portal.sites import start_network_sites
from labgate.portal.state import Portal
from labgate.portal.ui import pages
from labgate.resolver.locality import DataLocator
from labgate.scheduler.instances import InstanceManager
from labgate.scheduler.leader import Leadership, LeaseElection, SoleLeader, default_replica_id
from labgate.scheduler.reconcile import Reconciler
from labgate.scheduler.runs import RunProcessor
from labgate.scheduler.snapshots import SnapshotManager
from labgate.security import SecretBox, SessionSigner
from labgate.startup import env_name
from labgate.wire.site import Report, Reporter

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def ensure_site(session: Session, config: SiteConfig) -> None:
    """Record the site in the database, or update it to match the settings.

    A site of the settings is ``local``; one whose name a network site (added
    with ``labgate site add``) already holds is refused, not taken over.
    """
    site = session.scalar(select(Site).where(Site.name == config.name))
    if site is None:
        site = Site(name=config.name)
        session.add(site)
    elif site.kind == SiteKind.network:
        raise ConfigError(
            f"invalid setting sites ({env_name('sites')}): site {config.name!r} is the name of "
            "a network site added with `labgate site add`; give the settings' site another name"
        )
    site.kind = SiteKind.local.value
    site.backend = config.backend
    site.labels = dict(config.labels)
    site.options = {
        "capacity": config.capacity.model_dump(),
        "data_root": str(config.data_root) if config.data_root else None,
        "group_root": str(config.group_root) if config.group_root else None,
    }


def start_site(portal: Portal, config: SiteConfig, reporter: Reporter) -> LocalSiteLink:
    """Bring up the agent of one site, in process, and the link to it."""
    return LocalSiteLink(build_site_agent(portal.settings, config, reporter))


def build_portal(settings: Settings, *, replicated: bool = False) -> Portal:
    """Database, catalog and credentials, ready before the app starts serving.

    ``replicated`` (``labgate portal``): one of several portal processes on one
    PostgreSQL database, running no sites of its own and electing a leader for
    the loops that run once; SQLite is refused.
    """
    if replicated:
        refuse_unreplicable(settings)
    # Refused here, before a database is made, when others could read it or the key is weak.
    prepare_data_dir(settings.data_dir)
    key = settings.signing_key()
    db = open_database(settings.effective_database_url)
    catalog = load_catalog(settings.tools_dir)
    signer = SessionSigner(key, settings.session_max_age)
    box = SecretBox(key)
    with db.session() as session:
        seal_plain_secrets(session, box)
    routes = RouteFeedHub(catalog, box)
    replica = settings.replica_id or default_replica_id()
    leader: Leadership = (
        LeaseElection(db, replica, settings.leader_lease_seconds)
        if replicated
        else SoleLeader(replica)
    )
    return Portal(
        settings=settings,
        db=db,
        catalog=catalog,
        signer=signer,
        box=box,
        routes=routes,
        leader=leader,
        replicated=replicated,
    )


def refuse_unreplicable(settings: Settings) -> None:
    """``labgate portal`` needs PostgreSQL and runs no sites of its own: say so in one line."""
    url = settings.effective_database_url
    if not url.startswith("postgresql"):
        raise ConfigError(
            f"`labgate portal` needs PostgreSQL: set database_url ({env_name('database_url')}) "
            "to postgresql+psycopg://USER:PASSWORD@HOST/DB; SQLite serves one process only "
            "(use `labgate serve`)"
        )
    if settings.sites:
        raise ConfigError(
            f"`labgate portal` runs no sites of its own: remove the setting sites "
            f"({env_name('sites')}) and add each site with `labgate site add`, its agent "
            "run by `labgate agent`"
        )


def announce_admin(settings: Settings, password: str) -> None:
    """Print the generated admin password, once, where the operator sees it."""
    print(
        f"\nlabgate: created admin account {settings.admin_username!r} "
        f"with password: {password}\n(shown once; change it with `labgate user passwd`)\n",
        file=sys.stderr,
        flush=True,
    )


async def first_admin(portal: Portal) -> None:
    """On first start, create the admin: the configured password, or a generated one."""
    settings = portal.settings
    if not await portal.run_db(no_users):
        return
    # A configured password already passed the policy when the settings were read.
    configured = settings.admin_password.get_secret_value()
    password = configured or generate_password()
    password_hash = await portal.passwords.hash_new(password, settings.admin_username)
    created = await portal.run_db(
        lambda s: bootstrap_admin(s, settings.admin_username, password_hash)
    )
    if created and not configured:
        announce_admin(settings, password)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the site and re-attach instances; on exit leave them running."""
    portal: Portal = app.state.portal
    settings = portal.settings
    await first_admin(portal)
    # Elected before the loops start: a lone replica (and `serve`) leads from the start.
    await portal.leader.start()

    async def reporter(report: Report) -> None:
        await portal.instances.apply(report)

    for site in portal.local_sites:
        await portal.run_db(partial(ensure_site, config=site))
        local = portal.links[site.name] = start_site(portal, site, reporter)
        # Which tools' images its engine holds, before the tools page and placement ask.
        await local.agent.refresh_tools(list(portal.catalog))
    portal.manager = InstanceManager(
        portal.db,
        portal.catalog,
        portal.links,
        max_instances_per_user=settings.max_instances_per_user,
        events=portal.events,
        box=portal.box,
        routes=portal.routes,
        data=DataLocator(settings),
        fairness=settings.start_queue_fairness,
        own_hosts=bool(settings.instance_host),
    )
    metrics = operations.wire(app, portal)
    # The route table from the database; on PostgreSQL, following the other replicas.
    replicas = app.state.replicas = Replicas(portal)
    await replicas.start()
    # Network sites' links first: restore loses an instance whose site has no link.
    liveness = await start_network_sites(portal, replicas.relay.call if replicas.relay else None)
    await portal.manager.restore()
    processor = RunProcessor(
        portal.db,
        portal.links,
        lambda owner: settings.workspaces_dir / owner,
        admission=portal.manager.run_admission,
        tasks_per_site=settings.run_tasks_per_site,
        limits=portal.instances.user_defaults,
        grace=settings.site_grace_period,
        api_url=f"{settings.effective_public_url}/api/v1",
        token_key=settings.secret_key.get_secret_value(),
    )
    processor.leader = portal.leader
    processor.shared = portal.replicated
    portal.run_processor = processor
    portal.manager.task_reports = lambda report, site: processor.apply(report, site=site)
    await processor.restore()
    processor.start()
    ops = await operations.start_operations(app, portal, metrics)
    portal.snapshots = SnapshotManager(
        portal.db,
        portal.links,
        portal.manager.apply,
        storage_per_user=settings.snapshot_storage_per_user,
    )
    # After restore: containers of instances that ended while labgate was down go now.
    reconciler = Reconciler(
        portal.db, portal.links, settings.reconcile_interval, portal.snapshots, portal.leader
    )
    if portal.leader.leading:
        await reconciler.run_once()
    reconciler.start()
    portal.leader.on_elected(reconciler.poke)
    portal.leader.on_elected(ops.pools.poke)
    portal.passwords.prepare()
    try:
        yield
    finally:
        # The loops stop before the lease is handed over: none acts after another leads.
        await ops.close()
        await liveness.close()  # first: the hub's closing connections are no departures
        await replicas.close()
        if portal.site_hub is not None:
            await portal.site_hub.close()
        if portal.tunnel_routers is not None:
            await portal.tunnel_routers.close()
        await reconciler.close()
        await portal.snapshots.close()
        await processor.close()
        await portal.manager.close()
        await portal.leader.close()
        if portal.routes is not None:
            portal.routes.table.disconnect_all()
        for link in portal.links.values():
            await link.close()
        portal.db.dispose()
        portal.passwords.close()
        for provider in portal.providers.values():
            await provider.close()


def create_app(settings: Settings | None = None, portal: Portal | None = None) -> FastAPI:
    """The portal as an ASGI app."""
    settings = settings or Settings()
    portal = portal or build_portal(settings)
    app = FastAPI(
        title="labgate",
        version=__version__,
        description="Research tools next to the data, behind one authenticated front door.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # labgate.portal.apidocs serves it, without a CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.portal = portal
    app.state.oauth = oauth.OAuthState(portal.signer.key)
    #: The CSP source of every instance host (``https://*.apps.example.org``), or "".
    app.state.instance_hosts_source = (
        settings.instance_url("*").rstrip("/") if settings.instance_host else ""
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_body)
    # API and OAuth answers carry secrets (new tokens, CSRF tokens): no cache keeps them.
    app.add_middleware(NoStoreMiddleware)
    if settings.effective_public_url.startswith("https://") and settings.hsts_max_age > 0:
        app.add_middleware(HstsMiddleware, max_age=settings.hsts_max_age)

    api = APIRouter(prefix=API_PREFIX)
    modules = (auth, users, tokens, catalog, sites, instances, datasets, resolve, snapshots)
    more = (router_api, groups, usage, lifecycle, agent, shares, runs, task_gateway)
    for module in (*modules, *more):
        api.include_router(module.router)

    @api.get("", tags=["meta"])
    async def api_root() -> dict[str, str]:
        """Name and version of this labgate."""
        return {"name": "labgate", "version": __version__}

    app.include_router(api)
    app.include_router(apidocs.router)
    app.include_router(pages.router)
    app.include_router(health.router)
    app.include_router(oauth.router)
    install_openapi(app)
    return app
