"""Run a task's Python callable: ``python -m labgate.agent.taskcall module:function``.

The callable gets the task's ``args`` as keyword arguments; its return value,
as JSON, becomes the task's result (``$LABGATE_RESULT``). An exception prints
its traceback and exits with status 1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def main(target: str) -> int:
    """Import and call ``target``; write its return value as the task's result."""
    module_name, _, function = target.partition(":")
    # Run by path, this file's directory is first on sys.path: labgate's agent modules
    # must not shadow the task's own (its results directory is searched instead).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), function)
        value = fn(**json.loads(os.environ.get("LABGATE_TASK_ARGS") or "{}"))
        text = json.dumps(value)
    except Exception:
        traceback.print_exc()
        return 1
    with open(os.environ["LABGATE_RESULT"], "w") as out:
        out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
