"""Every setting and command is documented, and the docs' numbers-free claims stay true."""

from __future__ import annotations

from pathlib import Path

from labgate.config import Settings

DOCS = Path(__file__).parent.parent / "docs"


def test_every_setting_is_in_the_configuration_guide():
    text = (DOCS / "configuration.md").read_text()
    missing = [
        name
        for name in Settings.model_fields
        if f"`{name}`" not in text or f"`LABGATE_{name.upper()}`" not in text
    ]
    assert missing == [], f"document these settings in docs/configuration.md: {missing}"


def test_every_setting_has_help_text():
    assert [n for n, f in Settings.model_fields.items() if not f.description] == []


def test_readme_links_resolve():
    import re

    readme = (DOCS.parent / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (DOCS.parent / target).is_file(), target


def test_every_cli_command_is_in_the_command_line_guide():
    from typing import Any

    import typer

    from labgate.cli import app

    def paths(command: Any, prefix: str) -> list[str]:
        if hasattr(command, "commands"):  # a group
            return [
                path
                for name, sub in command.commands.items()
                for path in paths(sub, f"{prefix} {name}")
            ]
        return [prefix]

    commands = paths(typer.main.get_command(app), "labgate")
    assert len(commands) > 30, commands
    text = (DOCS / "cli.md").read_text()
    missing = [c for c in commands if f"### `{c}`" not in text]
    assert missing == [], f"document these commands in docs/cli.md: {missing}"
