"""How the CLI shows things: tables for people, raw JSON for scripts.

Tables are Rich tables. Piped, a table that fits its width is printed without
Rich, byte for byte as Rich prints it (columns as wide as their widest cell,
two spaces apart), which saves importing and running Rich.

Tables go to stdout; progress and notes go to stderr, so the stdout of a
command such as ``labgate launch`` or ``labgate token create`` is exactly the
one thing a script wants from it.

Text from the server (a dataset's title, a run's reason, an event's message)
may have been written by another account: every table cell, note, error and
status line goes through :func:`visible`, which shows control characters and
bidirectional overrides as escapes (``\\x1b``) instead of writing them to the
terminal, where they would clear the screen, rewrite earlier lines or set the
clipboard (docs/security.md, "The command line").
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import typer

# Rich is imported when something is drawn at a terminal (or a table is too wide to
# print as it is): `labgate version`, `--help` of a command, a table with no rows and
# a table piped to another program start without it (benchmarks/cli_startup.py).
if TYPE_CHECKING:
    from rich.console import Console

STATE_STYLES = {
    "queued": "yellow",
    "pending": "yellow",
    "starting": "yellow",
    "running": "green",
    "stopping": "yellow",
    "stopped": "dim",
    "failed": "red",
    "lost": "red",
}
_UNITS = ("", "K", "M", "G", "T")
PIPE_WIDTH = 1000


def stdout() -> Console:
    """A console on stdout (made per call so captured streams are honoured).

    Piped into another program, tables are not wrapped at 80 columns (unless
    ``COLUMNS`` says so): a line per row is what ``grep`` and ``awk`` want.
    """
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def stderr() -> Console:
    """A console on stderr, for progress and notes."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON, uncoloured, for scripts.

    JSON escapes C0 controls itself; what else :func:`visible` would escape (DEL,
    C1, separators, bidirectional overrides) can only be inside strings, and is
    written as ``\\u`` escapes too: the same data, nothing a terminal acts on.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False)
    typer.echo(_UNSHOWN_IN_LINES.sub(lambda match: f"\\u{ord(match.group()):04x}", text))


#: What a terminal would act on rather than show: control characters (Unicode category
#: Cc: C0, DEL, C1), line and paragraph separators, and the bidirectional embeddings,
#: overrides and isolates (category Cf) that make text read otherwise than it is.
_UNSHOWN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: The same but tab and newline, for text laid out over lines.
_UNSHOWN_IN_LINES = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, *, lines: bool = False, markup: bool = False) -> str:
    """``text`` as it may reach a terminal: what a terminal would act on, shown as escapes.

    Every control character (ESC, CR, BEL, NUL, C1 codes such as CSI…), line
    and paragraph separator and bidirectional override or isolate becomes
    ``\\x1b`` or ``\\u202e``; a tab too, and a newline, unless ``lines`` (a cell
    or block that may run over lines: then a CR before a newline is dropped).
    With ``markup`` the result is also escaped for Rich markup (a string Rich
    renders as markup shows ``[bold]`` as it is). Every string from the server
    goes through this before it is printed.
    """
    if lines:
        text = _UNSHOWN_IN_LINES.sub(_escape, text.replace("\r\n", "\n"))
    else:
        text = _UNSHOWN.sub(_escape, text)
    if markup:
        from rich.markup import escape

        text = escape(text)
    return text


def line(text: str) -> None:
    """One line on stdout, made :func:`visible` (server text in a command's answer)."""
    typer.echo(visible(text))


def note(message: str) -> None:
    """A line for the person at the terminal, on stderr (no markup; shown :func:`visible`)."""
    typer.echo(visible(message), err=True)


def when(value: str | None) -> str:
    """An API timestamp as local time to the minute; empty for none."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def size(value: Any) -> str:
    """A byte count the way people write it: 512M, 2G, 1.5G."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    amount, unit = float(value), 0
    while amount >= 1024 and unit < len(_UNITS) - 1:
        amount /= 1024
        unit += 1
    text = f"{amount:.1f}".removesuffix(".0")
    return f"{text}{_UNITS[unit]}"


class Styled(NamedTuple):
    """A table cell drawn in ``style`` (a Rich style such as ``green``) at a terminal."""

    text: str
    style: str


Cell = str | Styled


def state(value: str) -> Styled:
    """An instance state, coloured."""
    return coloured(value, STATE_STYLES.get(value, ""))


def coloured(value: str, style: str) -> Styled:
    """A table cell drawn in ``style`` (a Rich style such as ``green``)."""
    return Styled(value, style)


# Columns that may wrap on a narrow terminal; the others (ids, names, URLs) keep one line.
_WRAPPING = frozenset({"DESCRIPTION", "SCOPES", "LABELS", "NOTE", "URL / REASON", "VALUE"})
# Rich's emoji codes (`:smile:`) in a cell; none of their names holds a "/".
_EMOJI_CODE = re.compile(r"(:(\S*?)(?:(?:\-)(emoji|text))?:)")
_GAP = "  "  # between columns: Rich's padding of one on each side (none at the edges)


def _piped() -> bool:
    """Whether Rich would draw stdout without styles: Rich's own test for a terminal."""
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "0"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force == ""
    try:
        return not sys.stdout.isatty()
    except ValueError:  # closed
        return True


def _plain_text(cell: Cell) -> str | None:
    """The cell's text if Rich would print it unchanged, one character a column; else None."""
    if isinstance(cell, Styled):
        text = cell.text
    else:
        text = cell
        if "[" in text or "\\" in text:  # markup, escaped for Rich: let Rich read it back
            return None
        for match in _EMOJI_CODE.finditer(text):
            if match.group(2) and "/" not in match.group(2):
                return None
    # Wide, combining and control characters are measured and drawn by Rich.
    return text if text.isascii() and text.isprintable() else None


def _plain_lines(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> list[str] | None:
    """The table as Rich prints it to a pipe, when that needs no Rich (else None).

    That is when stdout is no terminal (nothing is styled), every cell is plain
    text and the table fits the width as it is (nothing wraps or is cut): then
    Rich's table is each column as wide as its widest cell, two spaces apart.
    """
    if not _piped():
        return None
    columns_env = os.environ.get("COLUMNS")
    if columns_env is None:
        width = PIPE_WIDTH
    elif columns_env.isdigit():
        width = int(columns_env)
    else:
        return None
    table: list[list[str]] = [list(columns)]
    if any(_plain_text(column) is None for column in columns):
        return None
    for row in rows:
        if len(row) != len(columns):
            return None
        texts = [_plain_text(cell) for cell in row]
        if None in texts:
            return None
        table.append([text or "" for text in texts])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    if sum(widths) + len(_GAP) * (len(widths) - 1) > width:
        return None
    return [
        _GAP.join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]


def _visible_cell(cell: Cell, column: str) -> Cell:
    """A cell made :func:`visible`; a column that may wrap keeps its newlines and tabs."""
    lines = column in _WRAPPING
    if isinstance(cell, Styled):
        return Styled(visible(cell.text, lines=lines), cell.style)
    return visible(cell, lines=lines)


def _table(columns: Sequence[str], rows: Iterable[Sequence[Cell]], empty: str) -> None:
    materialised = [
        [_visible_cell(cell, columns[i] if i < len(columns) else "") for i, cell in enumerate(row)]
        for row in rows
    ]
    if not materialised:
        note(empty)
        return
    plain = _plain_lines(columns, materialised)
    if plain is not None:
        typer.echo("\n".join(plain))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=column not in _WRAPPING, overflow="fold")
    for row in materialised:
        # Cells are visible already; as markup, only Rich's brackets are left to escape.
        table.add_row(
            *(
                Text(c.text, style=c.style)
                if isinstance(c, Styled)
                else visible(c, lines=True, markup=True)
                for c in row
            )
        )
    console = stdout()
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    # Piped: no padding at the ends of lines.
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def plain_table(columns: list[str], rows: list[list[str]], empty: str) -> None:
    """A table whose cells never wrap, without padding at line ends (groups, usage, pools).

    Every cell is made :func:`visible` (no newline either: a row is one line).
    """
    if not rows:
        note(empty)
        return
    rows = [[visible(cell) for cell in row] for row in rows]
    plain = _plain_lines(columns, rows)
    if plain is not None:
        typer.echo("\n".join(plain))
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*(visible(cell, markup=True) for cell in row))
    console = stdout()
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _yes(flag: Any) -> str:
    return "yes" if flag else ""


def users(rows: list[dict[str, Any]]) -> None:
    """The users table."""
    _table(
        ("NAME", "ADMIN", "DATA PROVIDER", "DISABLED", "CREATED", "LAST LOGIN"),
        (
            (
                u["name"],
                _yes(u["is_admin"]),
                _yes(u.get("data_provider", False)),
                _yes(u["disabled"]),
                when(u["created_at"]),
                when(u["last_login_at"]),
            )
            for u in rows
        ),
        "no users",
    )


def tokens(rows: list[dict[str, Any]], *, show_user: bool) -> None:
    """The tokens table (the tokens themselves are never shown again)."""
    columns = [
        "ID",
        "PREFIX",
        *(["USER"] if show_user else []),
        "NOTE",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "LAST USED",
    ]
    _table(
        columns,
        (
            (
                str(t["id"]),
                t["prefix"] + "…",
                *([t["user"]] if show_user else []),
                t["note"],
                " ".join(t["scopes"]),
                when(t["created_at"]),
                when(t["expires_at"]) or "never",
                when(t["last_used_at"]),
            )
            for t in rows
        ),
        "no tokens",
    )


def _param(name: str, param: dict[str, Any]) -> str:
    """``name=default`` (or ``name=a|b|c`` for a choice) as `tool list` shows a parameter."""
    if param.get("choices"):
        return f"{name}={'|'.join(param['choices'])}"
    default = param.get("default")
    return f"{name}={default}" if default not in (None, "") else f"{name}=<{param['type']}>"


def tools(rows: list[dict[str, Any]]) -> None:
    """The tool catalog."""

    def available(tool: dict[str, Any]) -> Styled:
        if tool["available"]:
            return coloured("yes", "green")
        return coloured(f"no: {tool.get('unavailable_reason') or 'unknown reason'}", "red")

    _table(
        ("NAME", "TITLE", "CPU", "MEMORY", "PARAMS", "AVAILABLE", "DESCRIPTION"),
        (
            (
                t["name"],
                t["title"],
                str(t["resources"].get("cpu", "")),
                size(t["resources"].get("memory", "")),
                ", ".join(_param(name, p) for name, p in (t.get("params") or {}).items()),
                available(t),
                t["description"],
            )
            for t in rows
        ),
        "no tools in the catalog",
    )


def instances(rows: list[dict[str, Any]], *, empty: str) -> None:
    """The instances table."""
    _table(
        ("ID", "TOOL", "OWNER", "SITE", "STATE", "CREATED", "URL / REASON"),
        (
            (
                i["id"],
                i["tool"],
                i["owner"],
                i["site"] or "",
                state(i["state"]),
                when(i["created_at"]),
                _url_or_reason(i),
            )
            for i in rows
        ),
        empty,
    )


def _url_or_reason(instance: dict[str, Any]) -> str:
    """A running instance's URL, a queued one's place in its start queue, or the reason."""
    if instance["state"] == "running":
        return str(instance["url"])
    place = instance.get("queue")
    if instance["state"] == "queued" and place:
        return f"number {place['position']} in the start queue, about {place['estimate']}s"
    return str(instance["reason"])


def mapping(values: dict[str, Any], *, key: str = "SETTING") -> None:
    """A two-column table of names and values."""
    _table(
        (key, "VALUE"),
        ((name, "" if v is None else str(v)) for name, v in values.items()),
        "nothing to show",
    )


def datasets(rows: list[dict[str, Any]]) -> None:
    """The datasets table: identifier, title, size, and where its live replicas are."""
    _table(
        ("ID", "TITLE", "SIZE", "LIVE ON", "NOT LIVE ON"),
        (
            (
                d["id"],
                d["title"],
                size(d["size"]) if d["size"] is not None else "",
                " ".join(r["site"] for r in d["replicas"] if r["live"]),
                " ".join(r["site"] for r in d["replicas"] if not r["live"]),
            )
            for d in rows
        ),
        "no datasets",
    )


def replicas(rows: list[dict[str, Any]]) -> None:
    """The replicas of a dataset, and why any is not live."""
    _table(
        ("SITE", "PATH", "SIZE", "SOURCE", "REPORTED", "LIVE"),
        (
            (
                r["site"],
                r["path"],
                size(r["size"]) if r["size"] is not None else "",
                r["source"],
                when(r["reported_at"]),
                coloured("yes", "green")
                if r["live"]
                else coloured(f"no: {r.get('reason') or 'unknown'}", "red"),
            )
            for r in rows
        ),
        "no replicas",
    )
