"""Batch runs: the run definition (TOML or JSON), its Python builder, and a task's spec.

A run is a pipeline of stages; the stages run in order, the tasks of a stage
in parallel. A definition reads::

    name = "demo"
    [[stages]]
    name = "prepare"
    [[stages.tasks]]
    name = "fetch"
    command = ["python3", "-c", "print('hi')"]
    timeout = 60
    retries = 1
    where = {labels = {gpu = "yes"}, copies = 2}

or is built in Python::

    Pipeline("demo").then(Task("fetch", command=["true"])).then([Task("a", ...), Task("b", ...)])

:func:`parse_definition` reads either text form and raises :class:`DefinitionError`
with one line per problem. :class:`TaskSpec` is what the portal sends a site to
run one attempt of one task copy.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
#: Largest task timeout (seconds): a week.
MAX_TIMEOUT = 7 * 24 * 3600.0
#: Most memory a task may ask for, in MiB: 1 EiB (what the quota ledger holds in bytes).
MAX_MEMORY_MIB = 1024**4
MAX_RETRIES = 10
MAX_COPIES = 2000
MAX_TASKS = 2000


class DefinitionError(ValueError):
    """A run definition that does not parse or validate; one line per problem."""


def _name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 lowercase letters, digits, '_', '.', '-' "
            "and start with a letter or digit"
        )
    return value


class Where(BaseModel):
    """Where a task runs: a site, sites with labels, every matching site, N copies."""

    model_config = ConfigDict(extra="forbid")

    #: Only this site.
    site: str | None = None
    #: Only sites carrying every one of these labels.
    labels: dict[str, str] = Field(default_factory=dict)
    #: One copy on every live site that matches (``site``/``labels``).
    every: bool = False
    #: This many copies (on each matching site with ``every``).
    copies: int = Field(default=1, ge=1, le=MAX_COPIES)


class Environment(BaseModel):
    """What a task needs installed: nothing extra, or a Python requirements list."""

    model_config = ConfigDict(extra="forbid")

    #: Python requirements (pip lines); prepared once per distinct list.
    python: list[str] = Field(default_factory=list)
    #: A container image (sites with the containers backend).
    image: str = ""
    #: Extra environment variables for the task.
    variables: dict[str, str] = Field(default_factory=dict)


class TaskDef(BaseModel):
    """One task of a stage: a command or a Python callable, limits and placement."""

    model_config = ConfigDict(extra="forbid")

    name: str
    #: The command: a list of arguments, or one string run by ``/bin/sh -c``.
    command: list[str] | str | None = None
    #: A Python callable ``module:function`` importable in the task's environment;
    #: its JSON return value is the task's result.
    callable: str | None = None
    #: Keyword arguments for the callable (JSON).
    args: dict[str, Any] = Field(default_factory=dict)
    environment: Environment = Field(default_factory=Environment)
    cpu: float = Field(default=1.0, gt=0, le=1024)
    #: Memory in MiB: what it is charged and its limit (0: none asked and no limit, refused
    #: while the owner's memory is limited: docs/runs.md, "Tasks that ask no memory").
    memory_mib: int = Field(default=0, ge=0, le=MAX_MEMORY_MIB)
    timeout: float = Field(default=3600.0, gt=0, le=MAX_TIMEOUT)
    retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    where: Where = Field(default_factory=Where)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _name(value, "task name")

    @field_validator("callable")
    @classmethod
    def _valid_callable(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value):
            raise ValueError(f"callable {value!r} must read module:function")
        return value

    @model_validator(mode="after")
    def _one_action(self) -> TaskDef:
        if (self.command is None) == (self.callable is None):
            raise ValueError(f"task {self.name}: give exactly one of command and callable")
        if isinstance(self.command, list) and not self.command:
            raise ValueError(f"task {self.name}: the command is empty")
        return self


class StageDef(BaseModel):
    """Tasks that run in parallel; the next stage starts when all of them succeeded."""

    model_config = ConfigDict(extra="forbid")

    name: str
    tasks: list[TaskDef] = Field(min_length=1)
    #: Let the run go on when a task of this stage fails for good.
    continue_on_failure: bool = False

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _name(value, "stage name")


class RunDef(BaseModel):
    """A whole run: its name and its stages, in order."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    stages: list[StageDef] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _name(value, "run name")

    @model_validator(mode="after")
    def _unique(self) -> RunDef:
        stages = [s.name for s in self.stages]
        tasks = [t.name for s in self.stages for t in s.tasks]
        for kind, names in (("stage", stages), ("task", tasks)):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{kind} names must be unique in a run: {', '.join(twice)}")
        copies = sum(t.where.copies for s in self.stages for t in s.tasks)
        if copies > MAX_TASKS:
            raise ValueError(f"a run holds at most {MAX_TASKS} task copies, not {copies}")
        return self


def validate_definition(data: Any) -> RunDef:
    """A :class:`RunDef` from parsed data; :class:`DefinitionError` lists every problem."""
    try:
        return RunDef.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "definition"
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{where}: {message}")
        raise DefinitionError("\n".join(lines)) from None


def parse_definition(text: str, fmt: str = "auto") -> RunDef:
    """A run definition from TOML or JSON text (``fmt``: ``toml``, ``json`` or ``auto``)."""
    if fmt == "auto":
        fmt = "json" if text.lstrip().startswith("{") else "toml"
    try:
        data = json.loads(text) if fmt == "json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DefinitionError(f"not valid {fmt.upper()}: {exc}") from None
    return validate_definition(data)


class Task:
    """A task for :class:`Pipeline`: the same fields as a definition's task."""

    def __init__(self, name: str, **fields: Any) -> None:
        self.fields = {"name": name, **fields}

    def definition(self) -> dict[str, Any]:
        """The task as definition data."""
        return dict(self.fields)


class Pipeline:
    """Build a run in Python: ``Pipeline("x").then(task).then([a, b])``."""

    def __init__(self, name: str = "run") -> None:
        self.name = name
        self.stages: list[dict[str, Any]] = []

    def then(
        self,
        tasks: Task | list[Task],
        *,
        name: str | None = None,
        continue_on_failure: bool = False,
    ) -> Pipeline:
        """Add a stage: one task, or tasks that run in parallel."""
        group = tasks if isinstance(tasks, list) else [tasks]
        self.stages.append(
            {
                "name": name or f"stage{len(self.stages) + 1}",
                "tasks": [t.definition() for t in group],
                "continue_on_failure": continue_on_failure,
            }
        )
        return self

    def build(self) -> RunDef:
        """The validated definition (:class:`DefinitionError` when it is not valid)."""
        return validate_definition({"name": self.name, "stages": self.stages})

    def to_json(self) -> str:
        """The definition as JSON, for ``labgate run submit`` or ``POST /api/v1/runs``."""
        return self.build().model_dump_json(indent=2)


class TaskSpec(BaseModel):
    """One attempt of one task copy, as the portal sends it to a site."""

    model_config = ConfigDict(extra="ignore")

    attempt_id: str
    run_id: str
    task: str
    owner: str
    #: The owner's user id: on a process site run as root, the task runs as the uid
    #: the owner's instances run as (``instance_uid_base`` + this). None from an older
    #: portal: the base uid itself, which no user's instances get.
    owner_id: int | None = None
    #: Which try this is (1, 2, ...): ``$LABGATE_ATTEMPT`` for the task.
    attempt: int = 1
    command: list[str] | str | None = None
    callable: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float = 3600.0
    cpu: float = 1.0
    memory_mib: int = 0
    python: list[str] = Field(default_factory=list)
    image: str = ""
    #: The portal's API (``$LABGATE_API_URL``) and this attempt's token
    #: (``$LABGATE_TASK_TOKEN``) for notes to its run (``POST tasks/<attempt>/events``).
    api_url: str = ""
    token: str = ""
    #: The executor's own token (never the task's): it reports the attempt's state and
    #: result to the portal's gateway (``POST tasks/<attempt>/state``).
    executor_token: str = ""


#: Task attempt states a site reports (``Report.kind == "task"``).
TASK_REPORT_STATES = ("running", "succeeded", "failed", "cancelled", "lost")
