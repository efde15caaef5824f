"""The CLI's tables: piped, they are printed without Rich, exactly as Rich prints them.

Each case is drawn twice, by the plain path and by Rich (the plain path turned
off), and the two outputs must be the same bytes.
"""

from __future__ import annotations

import os
import random
import string
import sys
from collections.abc import Sequence

import pytest
from rich.console import Console

from labgate.cli import output
from labgate.cli.output import Cell, Styled

INSTANCES = ("ID", "TOOL", "OWNER", "SITE", "STATE", "CREATED", "URL / REASON")
RUNNING: list[Sequence[Cell]] = [
    (
        f"i-{n:04d}",
        "jupyterlab",
        "ada",
        "local",
        output.state("running"),
        "2026-12-02 10:00",
        f"http://127.0.0.1:8000/i/i-{n:04d}/",
    )
    for n in range(3)
]


def drawn(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    columns: Sequence[str],
    rows: list[Sequence[Cell]],
    *,
    rich: bool,
) -> str:
    with monkeypatch.context() as patch:
        if rich:
            patch.setattr(output, "_plain_lines", lambda *args: None)
        output._table(columns, rows, "nothing")
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def piped(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


# (columns, rows, COLUMNS or None, whether the plain path draws it)
CASES: dict[str, tuple[Sequence[str], list[Sequence[Cell]], str | None, bool]] = {
    "instances": (INSTANCES, RUNNING, "120", True),
    "instances, no COLUMNS": (INSTANCES, RUNNING, None, True),
    "reasons and empty cells": (
        INSTANCES,
        [
            ("i-1", "rstudio", "bob", "", output.state("failed"), "", "exited with status 1"),
            ("i-2", "demo", "bob", "hpc", output.state("queued"), "", "  spaces  kept  "),
        ],
        "200",
        True,
    ),
    "exactly the width": (("A", "B"), [("xxxx", "yyyy")], "10", True),
    "one over the width (Rich wraps)": (("A", "B"), [("xxxx", "yyyyy")], "10", False),
    "an emoji code (Rich replaces it)": (("NOTE",), [("done :thumbs_up: here",)], "80", False),
    "markup characters": (("NOTE",), [("[bold]x[/] and a\\",)], "80", False),
    "wide characters": (("TITLE",), [("数据集 données",)], "80", False),
    "a bad COLUMNS": (("A",), [("x",)], "wide", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_piped_table_is_printed_as_rich_prints_it(
    case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    columns, rows, width, plain = CASES[case]
    if width is not None:
        monkeypatch.setenv("COLUMNS", width)
    assert (output._plain_lines(columns, rows) is not None) == plain
    text = drawn(capsys, monkeypatch, columns, rows, rich=False)
    assert text == drawn(capsys, monkeypatch, columns, rows, rich=True)
    if case == "instances":
        assert text.splitlines()[:2] == [
            "ID      TOOL        OWNER  SITE   STATE    CREATED           URL / REASON",
            "i-0000  jupyterlab  ada    local  running  2026-12-02 10:00  "
            "http://127.0.0.1:8000/i/i-0000/",
        ]


def test_random_piped_tables_are_printed_as_rich_prints_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    chance = random.Random(18)
    alphabet = string.ascii_letters + string.digits + " :/._-[]"
    plain = 0
    for _ in range(300):
        columns = chance.sample(INSTANCES, chance.randint(1, len(INSTANCES)))
        rows: list[Sequence[Cell]] = []
        for _ in range(chance.randint(1, 4)):
            texts = ["".join(chance.choices(alphabet, k=chance.randint(0, 20))) for _ in columns]
            rows.append([Styled(t, "red") if chance.random() < 0.2 else t for t in texts])
        monkeypatch.setenv("COLUMNS", str(chance.randint(10, 100)))
        plain += output._plain_lines(columns, rows) is not None
        text = drawn(capsys, monkeypatch, columns, rows, rich=False)
        assert text == drawn(capsys, monkeypatch, columns, rows, rich=True), (columns, rows)
    assert plain > 50  # the plain path was taken often enough to be compared


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"FORCE_COLOR": "1"},
        {"FORCE_COLOR": ""},
        {"TTY_COMPATIBLE": "1"},
        {"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"},
        {"TTY_COMPATIBLE": "", "FORCE_COLOR": "1"},
    ],
    ids=lambda environ: ",".join(f"{k}={v}" for k, v in environ.items()) or "none",
)
@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_piped_means_what_rich_takes_for_no_terminal(
    environ: dict[str, str], terminal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Styles are left out only where Rich would leave them out."""
    main, other = os.openpty() if terminal else os.pipe()
    try:
        with open(other, "w", closefd=False) as stream:
            for name, value in environ.items():
                monkeypatch.setenv(name, value)
            monkeypatch.setattr(sys, "stdout", stream)
            assert output._piped() == (not Console(file=stream).is_terminal)
    finally:
        os.close(main)
        os.close(other)
