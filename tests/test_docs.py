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
        if hasattr(command, "list_commands"):  # a group (the root loads its groups on demand)
            ctx = typer.Context(command)
            return [
                path
                for name in command.list_commands(ctx)
                for path in paths(command.get_command(ctx, name), f"{prefix} {name}")
            ]
        return [prefix]

    commands = paths(typer.main.get_command(app), "labgate")
    assert len(commands) > 30, commands
    text = (DOCS / "cli.md").read_text()
    missing = [c for c in commands if f"### `{c}`" not in text]
    assert missing == [], f"document these commands in docs/cli.md: {missing}"


def test_every_security_rule_names_tests_that_exist():
    """docs/security.md names, after each rule, the tests that hold it; each must exist.

    A rule reads ``path::name`` for its first test and ``::name`` for more tests
    in the same file, or names a whole test file.
    """
    import ast
    import re

    root = DOCS.parent
    text = (DOCS / "security.md").read_text()
    rules = text.split("## Rules", 1)[1]
    missing: list[str] = []
    named = 0
    current: Path | None = None
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+)(?:\[[^\]]*\])?)?`", rules):
        if path:
            current = root / path
            if not current.is_file():
                missing.append(path)
                continue
        if not name:
            continue
        named += 1
        if current is None:
            missing.append(f"::{name} (no file named before it)")
            continue
        tree = ast.parse(current.read_text())
        defined = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        if name not in defined:
            missing.append(f"{current.relative_to(root)}::{name}")
    assert named > 40, named
    assert missing == [], f"docs/security.md names tests that do not exist: {missing}"
