"""The garbage collector while a server starts: paused, then the heap frozen and collecting again.

Each case runs in a fresh interpreter: freezing the test process's own heap
would keep its garbage for the rest of the session.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "paused_then_resumed": """
pause()
print(gc.isenabled(), gc.get_freeze_count() == 0)
made = [[n] for n in range(1000)]  # what a start makes, alive after it
resume()
print(gc.isenabled(), gc.get_freeze_count() >= len(made))
""",
    "resume_without_pause_freezes_nothing": """
resume()
print(gc.isenabled(), gc.get_freeze_count() == 0)
""",
    "a_collector_stopped_by_someone_else_stays_stopped": """
gc.disable()
pause()
resume()
print(gc.isenabled(), gc.get_freeze_count() == 0)
""",
}
EXPECTED = {
    "paused_then_resumed": ["False True", "True True"],
    "resume_without_pause_freezes_nothing": ["True True"],
    "a_collector_stopped_by_someone_else_stays_stopped": ["False True"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pause_and_resume(case: str) -> None:
    code = "import gc\nfrom labgate.gcpause import pause, resume\n" + CASES[case]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split("\n")[:-1] == EXPECTED[case]
