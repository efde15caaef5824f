"""Launch parameters: declarations in tool files, and every value checked before a launch."""

from __future__ import annotations

from pathlib import Path

import pytest

from labgate.tools.catalog import ToolFileError, load_tool_file
from labgate.tools.params import ParamError, ToolParam, default_values, resolve_params

PARAMS = {
    "size": ToolParam(type="choice", choices=["1280x800", "1920x1080"], default="1280x800"),
    "gpus": ToolParam(type="integer", min=0, max=4, default=0),
    "scale": ToolParam(type="number", min=0.5, max=2),
    "app": ToolParam(type="file", accept=["*.py"], default="app.py"),
    "verbose": ToolParam(type="boolean", default=False),
    "note": ToolParam(pattern="[a-z ]*", max_length=10),
}


def test_defaults_fill_what_is_not_given() -> None:
    assert resolve_params(PARAMS, None) == {
        "size": "1280x800",
        "gpus": "0",
        "scale": "",
        "app": "app.py",
        "verbose": "false",
        "note": "",
    }
    assert default_values(PARAMS) == resolve_params(PARAMS, {})


def test_given_values_are_normalised_to_strings() -> None:
    values = resolve_params(
        PARAMS,
        {"size": "1920x1080", "gpus": "2", "scale": 1.5, "app": "src/dash.py", "verbose": True},
    )
    assert values["size"] == "1920x1080"
    assert values["gpus"] == "2"
    assert values["scale"] == "1.5"
    assert values["app"] == "src/dash.py"
    assert values["verbose"] == "true"


@pytest.mark.parametrize(
    ("given", "name", "fragment"),
    [
        ({"colour": "red"}, "colour", "no such parameter"),
        ({"size": "800x600"}, "size", "one of: 1280x800, 1920x1080"),
        ({"gpus": 5}, "gpus", "at most 4"),
        ({"gpus": -1}, "gpus", "at least 0"),
        ({"gpus": 1.5}, "gpus", "an integer"),
        ({"gpus": True}, "gpus", "an integer"),
        ({"scale": "nan"}, "scale", "finite"),
        ({"scale": "big"}, "scale", "a number"),
        ({"app": "../other/app.py"}, "app", "relative to your workspace"),
        ({"app": "/etc/passwd"}, "app", "relative to your workspace"),
        ({"app": "notes.txt"}, "app", "named like *.py"),
        ({"app": "-m.py"}, "app", "must not start with '-'"),
        ({"note": "--help"}, "note", "must not start with '-'"),
        ({"note": "Hello"}, "note", "must match"),
        ({"note": "a\nb"}, "note", "control characters"),
        ({"note": "a\x85b"}, "note", "control characters"),  # C1: a line end to some
        ({"note": "a\u2028b"}, "note", "control characters"),
        ({"note": "a\u202eb"}, "note", "control characters"),  # reads right to left
        ({"note": "a" * 11}, "note", "at most 10 characters"),
        ({"note": 5}, "note", "a string"),
        ({"verbose": "maybe"}, "verbose", "true or false"),
    ],
)
def test_bad_values_are_refused_naming_the_parameter(
    given: dict[str, object], name: str, fragment: str
) -> None:
    with pytest.raises(ParamError) as caught:
        resolve_params(PARAMS, given)
    assert caught.value.name == name
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"params.{name}: ")


def test_a_required_parameter_must_be_given() -> None:
    params = {"app": ToolParam(type="file", required=True)}
    with pytest.raises(ParamError, match=r"params\.app: is required"):
        resolve_params(params, {})
    assert resolve_params(params, {"app": "a.R"}) == {"app": "a.R"}


@pytest.mark.parametrize(
    ("declaration", "fragment"),
    [
        ('type = "choice"', "needs choices"),
        ('type = "string"\nchoices = ["a"]', "choices are for"),
        ('type = "integer"\nmin = 3\nmax = 1', "min is above max"),
        ('type = "integer"\nmax = 1\ndefault = 2', "default: must be at most 1"),
        ('type = "string"\npattern = "("', "bad pattern"),
        ('type = "file"\nrequired = true\ndefault = "a.py"', "no default"),
        ('type = "colour"', "type"),
        ('type = "string"\nwidth = 3', "width"),
    ],
)
def test_bad_declarations_skip_the_tool_file(
    tmp_path: Path, declaration: str, fragment: str
) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        f'name = "t"\ntitle = "T"\n[params.p]\n{declaration}\n[process]\ncommand = ["x"]\n'
    )
    with pytest.raises(ToolFileError, match=fragment):
        load_tool_file(path)


def test_templates_may_only_name_declared_parameters(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        'name = "t"\ntitle = "T"\n[params.app]\ndefault = "a.py"\n'
        '[process]\ncommand = ["x", "{param_app}", "{param_other}"]\n'
    )
    with pytest.raises(ToolFileError, match=r"\{param_other\} names no parameter"):
        load_tool_file(path)
    path.write_text(
        'name = "t"\ntitle = "T"\n[params.app]\ndefault = "a.py"\n'
        '[process]\ncommand = ["x", "{workspace}/{param_app}"]\n'
    )
    tool = load_tool_file(path)
    assert list(tool.params) == ["app"]


def test_the_form_order_is_the_file_order(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        'name = "t"\ntitle = "T"\n[params.zeta]\n[params.alpha]\n[params.mid]\n'
        '[process]\ncommand = ["x"]\n'
    )
    assert list(load_tool_file(path).params) == ["zeta", "alpha", "mid"]
