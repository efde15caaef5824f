"""Launch parameters: what a tool asks at launch (its launch form), and their checks.

A tool file declares them in ``[params.<name>]`` tables, in the order the form
shows them (Open OnDemand's ``form.yml`` in TOML)::

    [params.app]
    type = "file"              # string, integer, number, boolean, choice, file
    label = "App file"
    help = "A Streamlit script in your workspace."
    default = "app.py"
    accept = ["*.py"]          # file: the names it takes

    [params.geometry]
    type = "choice"
    choices = ["1280x800", "1600x900", "1920x1080"]
    default = "1280x800"

    [params.gpus]
    type = "integer"
    min = 0
    max = 4
    default = 0

A launch gives values by name (``{"params": {"app": "dash.py"}}``); each one
is checked here, on the portal, before anything is recorded, and an
unknown name or a bad value is a 422 naming the parameter. Every parameter
then has a value (the launch's or the default) as a string, and it reaches
the tool twice: as ``{param_<name>}`` in the backend's command and
environment templates and as the environment variable
``LABGATE_PARAM_<NAME>``.

Values go into an argument vector, never a shell; still, a string or file
value may not start with ``-`` (it would read as an option of the tool) nor
hold control characters, and a file is a relative path inside the workspace
with no ``..`` part (docs/security.md).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PARAM_NAME_RE = r"^[a-z][a-z0-9_]{0,31}$"
ParamType = Literal["string", "integer", "number", "boolean", "choice", "file"]
#: Control characters (C0, DEL, C1), line and paragraph separators, and the bidirectional
#: overrides that make text read otherwise than it is.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_VALUE_LENGTH = 1024


class ParamError(ValueError):
    """A launch parameter's value is refused; ``name`` is the parameter."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"params.{name}: {message}")
        self.name = name
        self.message = message


class ToolParam(BaseModel):
    """One launch parameter of a tool: its type, limits, default and help."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType = "string"
    label: str = Field("", max_length=100)
    help: str = Field("", max_length=500)
    default: str | int | float | bool | None = None
    #: ``choice``: the values offered, in order.
    choices: list[str] = Field(default_factory=list)
    #: ``integer`` and ``number``: the bounds, inclusive.
    min: float | None = None
    max: float | None = None
    #: ``string``: a regular expression the whole value must match.
    pattern: str = ""
    max_length: int = Field(200, ge=1, le=MAX_VALUE_LENGTH)
    #: ``file``: glob patterns of the names it takes (``*.py``); empty: any file.
    accept: list[str] = Field(default_factory=list)
    #: Whether a launch must give a value (a required parameter has no default).
    required: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ToolParam:
        if self.type == "choice" and not self.choices:
            raise ValueError("a choice parameter needs choices")
        if self.choices and self.type != "choice":
            raise ValueError("choices are for type = 'choice'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is above max")
        if self.pattern:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"bad pattern: {exc}") from None
        if self.required and self.default is not None:
            raise ValueError("a required parameter has no default")
        if self.default is not None:
            try:
                self.check("default", self.default)
            except ParamError as exc:
                raise ValueError(f"default: {exc.message}") from None
        return self

    def check(self, name: str, value: Any) -> str:
        """``value`` checked against this parameter, as the string the tool gets."""
        if self.type == "boolean":
            return self._boolean(name, value)
        if self.type in ("integer", "number"):
            return self._number(name, value)
        if not isinstance(value, str):
            raise ParamError(name, "must be a string")
        if len(value) > self.max_length:
            raise ParamError(name, f"must be at most {self.max_length} characters")
        if self.type == "choice":
            if value not in self.choices:
                raise ParamError(name, f"must be one of: {', '.join(self.choices)}")
            return value
        if _CONTROL.search(value):
            raise ParamError(name, "must not hold control characters")
        if value.startswith("-"):
            raise ParamError(name, "must not start with '-'")
        if self.type == "file":
            return self._file(name, value)
        if self.pattern and re.fullmatch(self.pattern, value) is None:
            raise ParamError(name, f"must match {self.pattern}")
        return value

    def _boolean(self, name: str, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return "true" if value.lower() in ("true", "1", "yes") else "false"
        raise ParamError(name, "must be true or false")

    def _number(self, name: str, value: Any) -> str:
        number: float
        kind = "an integer" if self.type == "integer" else "a number"
        if isinstance(value, str):
            try:
                number = int(value) if self.type == "integer" else float(value)
            except ValueError:
                raise ParamError(name, f"must be {kind}") from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = value
        else:
            raise ParamError(name, f"must be {kind}")
        if not math.isfinite(number):
            raise ParamError(name, "must be a finite number")
        if self.type == "integer":
            if number != int(number):
                raise ParamError(name, "must be an integer")
            number = int(number)
        if self.min is not None and number < self.min:
            raise ParamError(name, f"must be at least {self.min:g}")
        if self.max is not None and number > self.max:
            raise ParamError(name, f"must be at most {self.max:g}")
        return str(number) if self.type == "integer" else f"{number:g}"

    def _file(self, name: str, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or value.endswith("/"):
            raise ParamError(name, "must be a file's path relative to your workspace")
        if self.accept and not any(fnmatch.fnmatch(path.name, glob) for glob in self.accept):
            raise ParamError(name, f"must be a file named like {' or '.join(self.accept)}")
        return str(path)


def resolve_params(
    params: Mapping[str, ToolParam], given: Mapping[str, Any] | None
) -> dict[str, str]:
    """Every parameter's value (given, else default) as a string; ParamError when refused."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(params))
    if unknown:
        known = ", ".join(params) or "none"
        raise ParamError(unknown[0], f"this tool has no such parameter (known: {known})")
    values: dict[str, str] = {}
    for name, param in params.items():
        value = given.get(name)
        if value is None or (value == "" and param.type not in ("string",)):
            if param.required:
                raise ParamError(name, "is required")
            if param.default is None:
                values[name] = ""
                continue
            value = param.default
        values[name] = param.check(name, value)
    return values


def default_values(params: Mapping[str, ToolParam]) -> dict[str, str]:
    """Each parameter's default as the tool gets it ("" when it has none)."""
    return {
        name: "" if param.default is None else param.check(name, param.default)
        for name, param in params.items()
    }


def param_env(values: Mapping[str, str]) -> dict[str, str]:
    """``LABGATE_PARAM_<NAME>`` for each value."""
    return {f"LABGATE_PARAM_{name.upper()}": value for name, value in values.items()}


def param_placeholders(values: Mapping[str, str]) -> dict[str, str]:
    """``param_<name>`` template values."""
    return {f"param_{name}": value for name, value in values.items()}


__all__ = [
    "PARAM_NAME_RE",
    "ParamError",
    "ToolParam",
    "default_values",
    "param_env",
    "param_placeholders",
    "resolve_params",
]
