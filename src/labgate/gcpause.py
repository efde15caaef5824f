"""The cyclic garbage collector while a server starts: paused, then its heap frozen.

Python's cyclic collector runs every few hundred new objects and, as the heap
grows, walks all of it again. A server's start makes its whole long-lived heap
(every module, the app, a route table of tens of thousands of users and
routes) and almost no cyclic garbage, so those walks find next to nothing:
on the start-up benchmark's database they were about 0.3 s of the imports
and as much again of loading the route table (``benchmarks/startup.py``).

:func:`pause` stops the collector before the imports; :func:`resume`, once the
server listens, moves everything alive to the permanent generation
(:func:`gc.freeze`: later collections never walk it) and starts the collector
again. The few cycles that became garbage during the start (about 1,500 objects
after the imports) are frozen with the rest and never freed.
"""

from __future__ import annotations

import gc


class _Pause:
    #: Whether :func:`pause` stopped the collector (and :func:`resume` has not run).
    active = False


def pause() -> None:
    """Stop the cyclic collector until :func:`resume` (a server about to start)."""
    if gc.isenabled():
        gc.disable()
        _Pause.active = True


def resume() -> None:
    """Freeze what the start made and collect again; nothing unless :func:`pause` stopped it."""
    if _Pause.active:
        _Pause.active = False
        gc.freeze()
        gc.enable()
