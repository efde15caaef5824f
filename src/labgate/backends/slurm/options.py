"""The site options of a ``slurm`` site, and what a user may choose among them at launch."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from labgate.backends.slurm.jobs import check_directive, format_time, parse_time
from labgate.errors import InstanceStartError

#: What a Unix account name may look like (useradd's rule, and no leading dash).
_ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?$")

#: The options a user may choose at launch, when the site lists allowed values for them.
CHOOSABLE = ("partition", "account", "qos", "reservation", "constraint", "gres", "time")


class SlurmOptions(BaseModel):
    """The ``options`` of a site with ``backend = "slurm"``."""

    model_config = ConfigDict(extra="forbid")

    slurm_conf: str = Field("", description="SLURM_CONF for the commands; empty: Slurm's default.")
    bin_dir: str = Field("", description="Where sbatch, squeue... are; empty: found on PATH.")
    partition: str = Field("", description="The partition jobs go to; empty: the default one.")
    account: str = Field("", description="The account jobs are charged to (--account).")
    qos: str = Field("", description="The quality of service (--qos).")
    reservation: str = Field("", description="The reservation jobs run in (--reservation).")
    constraint: str = Field("", description="Node features jobs need (--constraint).")
    gres: str = Field("", description="Generic resources, e.g. gpu:1 (--gres).")
    default_time: str = Field("8:00:00", description="The wall time of a job unless chosen.")
    max_time: str = Field("24:00:00", description="The longest wall time a user may choose.")
    extra_directives: list[str] = Field(
        default_factory=list, description="More #SBATCH lines, each as --name=value."
    )
    choices: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Values users may choose at launch, by option (partition, gres...).",
    )
    request_memory: bool = Field(True, description="Ask for the instance's memory with --mem.")
    jobs_dir: str = Field(
        "", description="Per-job files (shared with the nodes); empty: <data_dir>/slurm."
    )
    python: str = Field("", description="The Python 3 on the nodes that starts the tool.")
    endpoint_host: str = Field(
        "", description="The host the router connects to; empty: the job's node name."
    )
    ports: tuple[int, int] = Field(
        (20000, 30000), description="The port range tools are given on the nodes."
    )
    poll_interval: float = Field(2.0, gt=0, description="Seconds between queries of a job.")
    run_as: Literal["owner", "agent"] = Field(
        "owner",
        description="Whose Unix account a job runs as: its owner's (the agent must be root), "
        "or the agent's own (users of the site may then see each other's work).",
    )
    accounts: dict[str, str] = Field(
        default_factory=dict,
        description="The cluster account of a labgate user, by user name; "
        "a user not listed uses their labgate name.",
    )
    min_uid: int = Field(
        1000, ge=1, description="Accounts with a lower uid (root, daemons) run no jobs."
    )
    workspaces_dir: str = Field(
        "",
        description="Users' workspaces (shared with the nodes); empty: <data_dir>/workspaces.",
    )
    job_prefix: str = Field(
        "labgate", pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$", description="Job name prefix."
    )

    @field_validator("default_time", "max_time")
    @classmethod
    def _time(cls, value: str) -> str:
        if parse_time(value) is None:
            raise ValueError("a wall time must be finite (like 8:00:00)")
        return value

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, table: dict[str, str]) -> dict[str, str]:
        for user, account in table.items():
            if not _ACCOUNT_RE.match(account):
                raise ValueError(f"accounts: {account!r} (for {user!r}) is not a Unix account name")
        return table

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, lines: list[str]) -> list[str]:
        return [check_directive(line) for line in lines]

    @model_validator(mode="after")
    def _choices(self) -> SlurmOptions:
        unknown = sorted(set(self.choices) - set(CHOOSABLE))
        if unknown:
            raise ValueError(
                f"choices for {', '.join(unknown)}: only {', '.join(CHOOSABLE)} can be chosen"
            )
        for value in self.choices.get("time", []):
            if (parse_time(value) or 0) > self.max_seconds:
                raise ValueError(f"the time choice {value} is longer than max_time")
        if self.default_seconds > self.max_seconds:
            raise ValueError("default_time is longer than max_time")
        return self

    @property
    def default_seconds(self) -> int:
        """``default_time`` in seconds."""
        return parse_time(self.default_time) or 0

    @property
    def max_seconds(self) -> int:
        """``max_time`` in seconds."""
        return parse_time(self.max_time) or 0


@dataclass(frozen=True)
class Placement:
    """Where and for how long one job runs: the site's defaults with the user's choices."""

    partition: str
    account: str
    qos: str
    reservation: str
    constraint: str
    gres: str
    time_limit: int

    def as_json(self) -> dict[str, str]:
        """The placement as the instance's state keeps it."""
        return {
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "reservation": self.reservation,
            "constraint": self.constraint,
            "gres": self.gres,
            "time": format_time(self.time_limit),
        }


def choices_of(options: SlurmOptions) -> dict[str, dict[str, Any]]:
    """What a user may choose: per option with allowed values, its default and those values."""
    found: dict[str, dict[str, Any]] = {}
    for name, allowed in options.choices.items():
        if name == "time":
            found[name] = {
                "default": options.default_time,
                "allowed": list(allowed),
                "max": options.max_time,
            }
        else:
            default = str(getattr(options, name))
            values = [default] if default and default not in allowed else []
            found[name] = {"default": default, "allowed": values + list(allowed)}
    if "time" not in found:
        found["time"] = {"default": options.default_time, "allowed": [], "max": options.max_time}
    return found


def placement(options: SlurmOptions, chosen: Mapping[str, str]) -> Placement:
    """The site's defaults overridden by ``chosen``; InstanceStartError for a value not allowed."""
    values = {name: str(getattr(options, name, "")) for name in CHOOSABLE if name != "time"}
    time_limit = options.default_seconds
    for name, value in chosen.items():
        if name not in CHOOSABLE:
            raise InstanceStartError(
                f"{name!r} cannot be chosen on a Slurm site (choose {', '.join(CHOOSABLE)})"
            )
        allowed = options.choices.get(name, [])
        if name == "time":
            try:
                seconds = parse_time(value)
            except ValueError:
                raise InstanceStartError(f"time {value!r} is not a Slurm time") from None
            if seconds is None or seconds <= 0 or seconds > options.max_seconds:
                raise InstanceStartError(
                    f"time {value} is not allowed here (at most {options.max_time})"
                )
            if allowed and value not in allowed:
                raise InstanceStartError(f"time {value} is not allowed (choose {allowed})")
            time_limit = seconds
            continue
        if value != values[name] and value not in allowed:
            offered = ", ".join(allowed) if allowed else "none"
            raise InstanceStartError(f"{name} {value!r} is not allowed here (allowed: {offered})")
        values[name] = value
    return Placement(time_limit=time_limit, **values)
