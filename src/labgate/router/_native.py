"""The router's compiled hot path: which modules, where they live, whether to use them.

``make run`` and ``make test`` compile the modules of :data:`MODULES` with
mypyc (``scripts/compile-router.py``) into ``src/labgate/router/native/``,
next to a manifest of the sources they were built from. Importing this
module (the router package does it first) puts that directory first on the
package's ``__path__`` (:func:`use`), so
``import labgate.router.proxy`` loads the compiled module; the Python
sources stay the reference and the fallback. The compiled modules are used
only when every source still hashes to what they were built from: a module
edited since, a different Python (the extensions' suffix), or
``LABGATE_ROUTER_PURE=1`` in the environment, and the router runs the
Python sources (:data:`STATE` says which and why).

This module is never compiled itself and imports nothing of labgate.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import MutableSequence
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

#: The router modules compiled with mypyc: the per-request path.
MODULES = (
    "activity",
    "auth",
    "context",
    "exchange",
    "forwarded",
    "hosts",
    "http",
    "proxy",
    "upstream",
)
#: Hand-written C extensions built beside them (``_heads.c``: one-pass head scanners).
C_MODULES = ("_heads",)
#: Where the compiled extensions are put, and their manifest.
NATIVE_DIR = Path(__file__).with_name("native")
MANIFEST = NATIVE_DIR / "SOURCES.json"
#: Set to 1 to run the router's Python sources even when compiled ones are there.
PURE_ENV = "LABGATE_ROUTER_PURE"


def source_hashes() -> dict[str, str]:
    """SHA-256 of each compiled module's source (Python or C), by module name."""
    here = Path(__file__).parent
    sources = [f"{name}.py" for name in MODULES] + [f"{name}.c" for name in C_MODULES]
    return {
        source.rpartition(".")[0]: hashlib.sha256((here / source).read_bytes()).hexdigest()
        for source in sources
    }


def check(*, honour_env: bool = True) -> str:
    """``compiled`` when the compiled modules may be used, else why the sources run.

    ``honour_env=False``: whether they could be, whatever :data:`PURE_ENV` says.
    """
    if honour_env and os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"pure Python ({PURE_ENV} is set)"
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return "pure Python (not compiled: make run or make test compiles it)"
    try:
        sources = source_hashes()
    except OSError:
        return "pure Python (a compiled module's source is missing)"
    if not isinstance(manifest, dict) or manifest.get("sources") != sources:
        return "pure Python (sources changed since they were compiled: make compiles them again)"
    if not all(
        any((NATIVE_DIR / f"{name}{suffix}").exists() for suffix in EXTENSION_SUFFIXES)
        for name in (*MODULES, *C_MODULES)
    ):
        return "pure Python (compiled for another Python)"
    return "compiled"


#: What the router runs: ``compiled`` or ``pure Python (why)``; set by :func:`use`.
STATE = "pure Python (not checked yet)"


def use(package_path: MutableSequence[str]) -> str:
    """Put the compiled modules first on the router package's ``package_path`` when usable."""
    global STATE
    STATE = check()
    if STATE == "compiled" and str(NATIVE_DIR) not in package_path:
        package_path.insert(0, str(NATIVE_DIR))
    return STATE


use(sys.modules[__name__.rpartition(".")[0]].__path__)
