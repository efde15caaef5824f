"""Tool files: placeholders, literal braces, and the built-in catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from labgate.tools.catalog import Catalog, ProcessSpec


def test_doubled_braces_are_literal_and_placeholders_are_filled() -> None:
    spec = ProcessSpec(command=["{python}", '--x={{"a": True}}', "--port={port}"])
    spec.check_placeholders()
    command, _ = spec.render({"python": "/usr/bin/python3", "port": "8123"})
    assert command == ["/usr/bin/python3", '--x={"a": True}', "--port=8123"]


@pytest.mark.parametrize(
    ("part", "fragment"),
    [
        ("{colour}", "unknown placeholder {colour}"),
        ("{port.real}", "unknown placeholder {port.real}"),
        ('{"a": True}', "unknown placeholder"),
        ("--x={", "bad braces"),
        ("--x=}", "bad braces"),
    ],
)
def test_what_format_would_not_fill_is_refused(part: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("{", r"\{").replace(".", r"\.")):
        ProcessSpec(command=[part]).check_placeholders()


def test_the_builtin_jupyterlab_tool_loads_the_busy_reporter() -> None:
    catalog = Catalog.load()
    assert catalog.problems == []
    tool = catalog.get("jupyterlab")
    assert tool is not None
    process = tool.parsed("process", ProcessSpec)
    assert process is not None
    command, _ = process.render(
        {
            "python": "py",
            "port": "1",
            "base_url": "/i/x/",
            "workspace": "/w",
            "instance_id": "x",
            "user": "u",
            "instance_token": "t",
        }
    )
    extensions = (
        '--ServerApp.jpserver_extensions={"labgate.tools.jupyter_busy": True, '
        '"labgate.tools.jupyter_pageconfig": True}'
    )
    assert extensions in command


def test_a_stray_value_is_still_refused(tmp_path: Path) -> None:
    directory = tmp_path / "tools"
    directory.mkdir()
    (directory / "t.toml").write_text('name = "t"\ntitle = "T"\nhelth_path = "/"\n')
    catalog = Catalog.load(directory)
    assert catalog.get("t") is None
    assert any("helth_path: Extra inputs" in p.reason for p in catalog.problems)


def test_a_socket_command_listens_on_the_socket_it_is_given() -> None:
    spec = ProcessSpec(
        command=["tool", "--port={port}"], socket_command=["tool", "--sock={socket}"]
    )
    values = {"port": "8123", "socket": "/run/labgate/tool.sock"}
    assert spec.render(values)[0] == ["tool", "--port=8123"]
    assert spec.render(values, on_socket=True)[0] == ["tool", "--sock=/run/labgate/tool.sock"]
    # A tool without one listens on its port wherever it runs.
    plain = ProcessSpec(command=["tool", "--port={port}"])
    assert plain.render(values, on_socket=True)[0] == ["tool", "--port=8123"]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"socket_command": ["tool", "--port={port}"]}, "unknown placeholder {port}"),
        ({"socket_command": ["tool"]}, "must listen on {socket}"),
        ({"socket_command": []}, "at least 1 item"),
        (
            {"socket_command": ["tool", "{socket}"], "private_network": True},
            "private_network cannot have a socket_command",
        ),
        ({"command": ["tool", "--sock={socket}"]}, "unknown placeholder {socket}"),
        (
            {"socket_command": ["tool", "{socket}"], "env": {"APP_PORT": "{port}"}},
            "env cannot use {port}",
        ),
    ],
)
def test_a_socket_command_that_would_not_listen_on_its_socket_is_refused(
    fields: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        ProcessSpec.model_validate({"command": ["tool", "--port={port}"], **fields})


def test_the_builtin_demo_listens_on_a_socket_where_a_site_asks() -> None:
    tool = Catalog.load().get("demo")
    assert tool is not None
    process = tool.parsed("process", ProcessSpec)
    assert process is not None and process.socket_command is not None
    command, _ = process.render(
        {"python": "py", "port": "1", "base_url": "/i/x/", "socket": "/s/tool.sock"},
        on_socket=True,
    )
    assert command == ["py", "-m", "labgate.tools.demo", "--socket", "/s/tool.sock",
                       "--base-url", "/i/x/"]  # fmt: skip
