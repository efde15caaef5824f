"""Types shared by the request bodies of every API module.

Request bodies are strict: a field typed ``bool`` takes ``true`` or
``false``, not ``0`` or ``"yes"``; an ``int`` takes a whole JSON number, not
``"5"``, ``5.0`` or ``true``; a ``str`` takes a string, not a number. A
client that sends the wrong type gets a 422 naming the field, instead of a
guess. Query parameters are not bodies: they arrive as text and are parsed.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

#: The largest integer the databases hold (a signed 64-bit BIGINT): a larger id, offset or
#: count in a request is a 422, not an overflow deep in the driver.
MAX_INT = 2**63 - 1
#: The largest row id (ids are 32-bit INTEGER columns).
MAX_ID = 2**31 - 1
#: The longest duration a request may name, in seconds (ten years): longer ones overflow dates.
MAX_SECONDS = 10 * 366 * 86400


class Strict(BaseModel):
    """A request body: unknown fields and values of the wrong JSON type are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _iso_text(value: Any) -> Any:
    # JSON has no time type: a time is ISO 8601 text. Strict mode alone would
    # refuse the text (FastAPI validates the parsed JSON, not the raw bytes),
    # lax mode would take a bare number as Unix seconds: neither is wanted.
    if isinstance(value, str | datetime):
        return value
    raise ValueError("expected a time as ISO 8601 text, e.g. 2026-11-22T18:00:00Z")


#: A time in a request body: ISO 8601 text only.
Timestamp = Annotated[datetime, Field(strict=False), BeforeValidator(_iso_text)]


#: Bidirectional embeddings, overrides and isolates: text that shows in another order than
#: it is stored ("Trojan Source"), so a name can pass for another one in a list.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _refused(value: str, allowed: str = "") -> str:
    bad = next(
        (
            ch
            for ch in value
            if (unicodedata.category(ch) == "Cc" and ch not in allowed) or ch in _BIDI_CONTROLS
        ),
        None,
    )
    if bad is not None:
        raise ValueError(f"must not contain control characters (found U+{ord(bad):04X})")
    return value


def _no_control(value: str) -> str:
    return _refused(value)


def _no_control_but_lines(value: str) -> str:
    return _refused(value, "\t\n\r")


#: One line of text for people (a name): no NUL, newline or other control character, and no
#: bidirectional override.
LineText = Annotated[str, AfterValidator(_no_control)]
#: Text for people (a description): lines and tabs, but no NUL, other control character or
#: bidirectional override.
PlainText = Annotated[str, AfterValidator(_no_control_but_lines)]
