"""The installed backends, and what they say about the catalog's tools.

The tool catalog (:mod:`labgate.tools.catalog`) sits below the backends and
keeps each backend's table of a tool file raw. This module, above both, asks
the backends: :func:`load_catalog` loads the catalog and checks every table
with the backend that reads it, and :func:`tool_unavailable_reason` says why a
tool cannot run on a named backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from labgate.backends.base import Backend, BackendNotFound, installed_backends, load_backend
from labgate.tools.catalog import Catalog, CatalogProblem, Tool, ToolSectionError

log = logging.getLogger(__name__)

_CLASSES: dict[str, type[Backend]] = {}


def backend_class(name: str) -> type[Backend]:
    """The installed backend ``name``, loaded once (a failed look-up is tried again)."""
    found = _CLASSES.get(name)
    if found is None:
        found = _CLASSES[name] = load_backend(name)
    return found


def tool_unavailable_reason(tool: Tool, backend: str) -> str | None:
    """Why ``tool`` cannot run on the backend called ``backend`` here, or None when it can.

    The backend answers (:meth:`Backend.unavailable_reason`): whether the tool
    has its table, the table is valid, and what it needs is present.
    """
    try:
        cls = backend_class(backend)
    except (BackendNotFound, ImportError) as exc:
        return f"backend {backend!r} is not available: {exc}"
    return cls.unavailable_reason(tool)


def check_sections(
    tools: Iterable[Tool], backends: dict[str, type[Backend]]
) -> list[CatalogProblem]:
    """Validate every tool's tables with the backends that read them; the problems found.

    A table no backend reads is ignored; one that fails its backend's schema
    leaves the tool unable to run on that backend. Neither stops the tool loading.
    """
    readers: dict[str, list[type[Backend]]] = {}
    for backend in backends.values():
        if backend.tool_section:
            readers.setdefault(backend.tool_section, []).append(backend)
    problems: list[CatalogProblem] = []
    for tool in tools:
        for section in sorted(tool.sections):
            reason: str | None = None
            if section not in readers:
                reason = f"[{section}] is read by no installed backend; ignored"
            refused: list[str] = []
            for backend in readers.get(section, []):
                try:
                    backend.tool_spec(tool)
                except ToolSectionError as exc:
                    # Backends reading one table (process, slurm) refuse it alike: said once.
                    refused.append(backend.name)
                    reason = f"{exc}: cannot run on the {' or '.join(refused)} backend"
            if reason is not None:
                log.warning("tool %s (%s): %s", tool.name, tool.source, reason)
                problems.append(CatalogProblem(file=tool.source, reason=reason))
    return problems


def load_catalog(extra_dir: Path | None = None) -> Catalog:
    """The catalog (:meth:`Catalog.load`), its tables checked by the installed backends."""
    catalog = Catalog.load(extra_dir)
    catalog.problems.extend(check_sections(catalog, installed_backends()))
    return catalog
