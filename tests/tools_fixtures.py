"""Test doubles of tools: real variants of the demo tool, written as tool files."""

from __future__ import annotations

from pathlib import Path

DEMO_COMMAND = (
    'command = ["{python}", "-m", "labgate.tools.demo", "--port", "{port}", '
    '"--base-url", "{base_url}"]'
)

VARIANTS = {
    "crashing": ('DEMO_CRASH = "1"', 30),
    "never-ready": ('DEMO_NEVER_READY = "1"', 2),
    "slow": ('DEMO_START_DELAY = "1.5"', 30),
}


def write_test_tools(directory: Path) -> Path:
    """Tool files for crashing, never-ready and slow demo variants, plus a broken file."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (env, timeout) in VARIANTS.items():
        (directory / f"{name}.toml").write_text(
            f'name = "{name}"\ntitle = "{name}"\nhealth_path = "/api/health"\n'
            f"start_timeout = {timeout}\n\n[process]\n{DEMO_COMMAND}\nenv = {{ {env} }}\n"
        )
    (directory / "broken.toml").write_text('name = "Broken Name"\ntitle = ""\n')
    (directory / "garbled.toml").write_text("name = \n")
    return directory
