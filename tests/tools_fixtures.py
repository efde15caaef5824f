"""Test doubles of tools: real variants of the demo tool, written as tool files."""

from __future__ import annotations

from pathlib import Path

#: The demo command as a TOML array, for tool files written by tests.
DEMO_ARGV = (
    '["{python}", "-m", "labgate.tools.demo", "--port", "{port}", "--base-url", "{base_url}"]'
)
DEMO_COMMAND = f"command = {DEMO_ARGV}"
#: A demo culled after 2 s without use (idle-culling tests).
QUICK_TOOL = f"""
name = "quick"
title = "Demo culled after 2 s idle"
health_path = "/api/health"
idle_timeout = 2
[process]
command = {DEMO_ARGV}
"""


def costly_tool(name: str, delay: float, cost: float = 1) -> str:
    """A demo that takes ``delay`` seconds to listen and whose start costs ``cost`` cores."""
    return (
        f'name = "{name}"\ntitle = "Slow demo"\nhealth_path = "/api/health"\n'
        f"start_timeout = 30\nstart_cost = {cost:g}\n\n[process]\n{DEMO_COMMAND}\n"
        f'env = {{ DEMO_START_DELAY = "{delay:g}" }}\n'
    )


#: A demo with a launch form: each kind of parameter, one of them in its environment.
FORM_TOOL = f"""
name = "form"
title = "Form test"
health_path = "/api/health"
[params.size]
type = "choice"
label = "Screen size"
choices = ["1280x800", "1920x1080"]
default = "1280x800"
[params.gpus]
type = "integer"
min = 0
max = 4
default = 0
help = "GPUs to attach."
[params.app]
type = "file"
label = "App file"
accept = ["*.py", "*.R"]
default = "app.py"
[params.verbose]
type = "boolean"
default = false
[params.note]
type = "string"
pattern = "[a-z ]*"
max_length = 20
[process]
command = {DEMO_ARGV}
env = {{ DEMO_SIZE = "{{param_size}}", DEMO_APP = "{{param_app}}" }}
"""

VARIANTS = {
    "crashing": ('DEMO_CRASH = "1"', 30),
    "never-ready": ('DEMO_NEVER_READY = "1"', 2),
    "slow": ('DEMO_START_DELAY = "1.5"', 30),
}


def write_test_tools(directory: Path) -> Path:
    """Tool files for crashing, never-ready, slow and hog demo variants, plus broken files."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (env, timeout) in VARIANTS.items():
        (directory / f"{name}.toml").write_text(
            f'name = "{name}"\ntitle = "{name}"\nhealth_path = "/api/health"\n'
            f"start_timeout = {timeout}\n\n[process]\n{DEMO_COMMAND}\nenv = {{ {env} }}\n"
        )
    # Its start takes all of a site's start room for 30 s: every other launch there queues.
    (directory / "hog.toml").write_text(
        'name = "hog"\ntitle = "hog"\nhealth_path = "/api/health"\nstart_timeout = 60\n'
        f'start_cost = 1024\n\n[process]\n{DEMO_COMMAND}\nenv = {{ DEMO_START_DELAY = "30" }}\n'
    )
    (directory / "form.toml").write_text(FORM_TOOL)
    (directory / "broken.toml").write_text('name = "Broken Name"\ntitle = ""\n')
    (directory / "garbled.toml").write_text("name = \n")
    return directory
