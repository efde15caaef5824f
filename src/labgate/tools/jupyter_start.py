"""Start JupyterLab's server without the start-up cost nobody uses.

``python -m labgate.tools.jupyter_start [jupyter lab options]`` is
``python -m jupyterlab`` less about two thirds of its start-up CPU, measured on
the 2-core development VM (docs/tools.md#jupyterlab).

That share goes to one import: ``jupyter_events`` asks ``jsonschema`` for its
format checkers, and ``jsonschema`` imports ``rfc3987_syntax`` (when installed,
as ``jsonschema[format-nongpl]`` does) for the ``iri`` and ``iri-reference``
formats, which builds some thirty Lark Earley parsers at import. No schema of
the Jupyter server or its extensions uses those formats. Marking the module as
absent makes ``jsonschema`` skip those two checkers, as it does wherever the
package is not installed; every other format keeps its checker. Only the server
process is affected: kernels are processes of their own, where user code
imports what it likes.
"""

from __future__ import annotations

import sys

#: Modules the server never needs whose import costs seconds of CPU.
SKIPPED = ("rfc3987_syntax",)


def skip_unused() -> None:
    """Mark :data:`SKIPPED` as not installed: importing them raises ImportError."""
    for name in SKIPPED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main() -> None:
    """Run JupyterLab's server with :data:`SKIPPED` marked as not installed."""
    skip_unused()
    from jupyterlab.labapp import main as lab_main

    sys.exit(lab_main())


if __name__ == "__main__":
    main()
