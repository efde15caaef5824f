"""JupyterLab under labgate: a way back to labgate, and no news prompt.

A jupyter_server extension that adds a ``page_config_hook``, which edits the
page configuration JupyterLab hands its front end on every page load:

- ``hubPrefix`` (and ``hubHost``, ``hubUser``), as JupyterHub's single-user
  server sets them. JupyterLab's own hub extension then adds the **Hub** menu
  with **Hub Control Panel** (opens ``<hubPrefix>home``) and **Log Out**, and
  its "server unavailable" dialog offers a restart at ``<hubPrefix>spawn``.
  labgate's portal answers ``/hub/home`` and ``/hub/spawn…`` with a redirect
  to the user's instances page (:mod:`labgate.portal.ui.views`), so the menu
  entry is the way back to labgate, as JupyterHub's control panel link is.
- the ``@jupyterlab/apputils-extension:announcements`` plugin is disabled:
  it asks every new user whether to fetch news from jupyter.org (which
  labgate turns off anyway with ``--LabApp.news_url=None``).

The built-in ``jupyterlab`` tool loads it with
``--ServerApp.jpserver_extensions={"labgate.tools.jupyter_pageconfig": True, …}``.
"""

from __future__ import annotations

import os
from typing import Any

#: Where the portal answers JupyterHub's control panel links (``/hub/home``).
HUB_PREFIX = "/hub/"
NEWS_PLUGIN = "@jupyterlab/apputils-extension:announcements"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """How jupyter_server finds this extension."""
    return [{"module": "labgate.tools.jupyter_pageconfig"}]


def labgate_page_config(handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
    """The page config with the hub menu pointing at labgate and the news prompt off."""
    page_config.setdefault("hubPrefix", HUB_PREFIX)
    page_config.setdefault("hubHost", "")
    user = handler.request.headers.get("X-Labgate-User") or os.environ.get("LABGATE_USER", "")
    page_config.setdefault("hubUser", user)
    disabled = page_config.get("disabledExtensions") or []
    if isinstance(disabled, dict):  # before JupyterLab turns it into a list
        disabled = [name for name, off in disabled.items() if off]
    if NEWS_PLUGIN not in disabled:
        disabled = [*disabled, NEWS_PLUGIN]
    page_config["disabledExtensions"] = disabled
    return page_config


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Install the hook, keeping one set before (it runs first)."""
    settings = serverapp.web_app.settings
    earlier = settings.get("page_config_hook")

    def hook(handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
        if earlier is not None:
            page_config = earlier(handler, page_config)
        return labgate_page_config(handler, page_config)

    settings["page_config_hook"] = hook
    serverapp.log.info("labgate page config: hub menu to %s, news prompt off", HUB_PREFIX)
