"""One real thing done in each built-in tool through the router, for every backend.

``tests/ui/test_tools_ui.py`` (process backend) and
``tests/ui/test_tools_containers_ui.py`` (containers backend) run the same
steps: a :class:`ToolUse` says what a tool's launch asks for, what its
workspace must hold first, and what the browser then does in it. The
workspace is a directory the test can read and write: on the host for the
process backend, the volume's mount point for containers.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from ui.support import Gateway, launch_via_api, wait_for


@dataclass(frozen=True)
class ToolUse:
    """A tool's launch and the one real thing a test does in it."""

    tool: str
    use: Callable[[Any, Path], None]
    params: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    timeout: float = 90


def use_tool(
    gateway: Gateway,
    user: str,
    use: ToolUse,
    workspace: Callable[[], Path],
    shot: str,
    *,
    docs: bool = False,
) -> str:
    """Put ``use.files`` in the workspace, launch, sign in at the tool and use it; the id.

    ``workspace`` gives the user's workspace directory; it is asked again after
    the launch (a container's volume may be made by the launch).
    """
    for name, text in use.files.items():
        path = workspace() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    instance_id = launch_via_api(gateway, user, use.tool, params=use.params, timeout=use.timeout)
    page = gateway.page()
    gateway.sign_in(page, user, path=f"/i/{instance_id}/")
    # A tool page whose scripts the browser dropped on a network change (a container
    # started on this machine; see Gateway.page) stays blank: load it again, at once if
    # the change came while the page loaded, else when the tool's steps failed.
    for attempt in range(3):
        last = attempt == 2
        page.wait_for_load_state("load")
        if not last and gateway.dropped_on_network_change(page):
            page.reload()
            continue
        try:
            use.use(page, workspace())
        except AssertionError:
            if last or not gateway.dropped_on_network_change(page):
                raise
            page.reload()
            continue
        break
    gateway.shot(page, shot, docs=docs)
    return instance_id


def vscode_terminal_writes_a_file_and_the_editor_opens_it(page: Any, workspace: Path) -> None:
    """VS Code: its terminal (a WebSocket through the router) writes a file; open it."""
    expect(page.locator(".monaco-workbench")).to_be_visible(timeout=60_000)
    page.keyboard.press("Control+Backquote")
    terminal = page.locator(".terminal-wrapper textarea.xterm-helper-textarea").first
    expect(terminal).to_be_attached(timeout=30_000)
    answer = workspace / "answer.txt"

    def written() -> bool:
        return answer.exists() and answer.read_text().strip() == "42"

    # Keys typed before the terminal's shell is up are lost: type again (the command
    # is idempotent) until the file is there.
    for _ in range(3):
        terminal.focus()
        page.keyboard.type("echo $((6*7)) > answer.txt\n", delay=20)
        with contextlib.suppress(AssertionError):
            wait_for(written, 20, "answer.txt")
            break
    wait_for(written, 5, "answer.txt")
    # The explorer shows the new file (code-server watches the workspace); open it.
    page.get_by_role("treeitem", name="answer.txt").click(timeout=30_000)
    editor = page.locator(".monaco-editor .view-lines").first
    expect(editor).to_contain_text("42", timeout=30_000)


def canvas_colours(page: Any) -> int:
    """How many distinct colours noVNC's canvas shows (a blank screen has one)."""
    return int(
        page.evaluate(
            """() => {
              const canvas = document.querySelector("#noVNC_container canvas, canvas");
              if (!canvas || !canvas.width) return 0;
              const data = canvas.getContext("2d")
                .getImageData(0, 0, canvas.width, canvas.height).data;
              const seen = new Set();
              for (let i = 0; i < data.length && seen.size < 50; i += 4 * 97) {
                seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
              }
              return seen.size;
            }"""
        )
    )


def desktop_shows_a_screen_and_its_xterm_takes_keys(page: Any, workspace: Path) -> None:
    """Desktop: noVNC shows a non-blank screen; keys typed on it make a file in the xterm."""
    page.wait_for_url(re.compile(r"/vnc\.html\?"), timeout=30_000)
    canvas = page.locator("#noVNC_container canvas")
    expect(canvas).to_be_visible(timeout=30_000)
    wait_for(lambda: canvas_colours(page) > 2, 30, "a non-blank desktop")
    # The xterm has the focus (it is the only window): typing goes to its shell.
    # The screen is drawn before the xterm's shell reads (seen in CI on a busy
    # machine: the keys went nowhere), so a command not done in 10 s is typed
    # again; `touch` twice is the same file.
    box = canvas.bounding_box()
    assert box is not None
    typed = workspace / "typed-on-the-desktop"
    for _ in range(4):
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        canvas.focus()
        for key in "touch typed-on-the-desktop":
            page.keyboard.press("Minus" if key == "-" else ("Space" if key == " " else key))
            time.sleep(0.02)
        page.keyboard.press("Enter")
        deadline = time.monotonic() + 10
        while not typed.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if typed.exists():
            break
    assert typed.exists(), "the xterm made no file from the keys typed on the desktop"


STREAMLIT_APP = """\
import streamlit as st

x = st.number_input("x", value=3)
st.write(f"square of x: {x * x}")
"""


def streamlit_squares_its_input(page: Any, workspace: Path) -> None:
    """Streamlit: the app shows x², for the default x and for one typed in."""
    expect(page.get_by_text("square of x: 9")).to_be_visible(timeout=60_000)
    input_field = page.get_by_label("x")
    input_field.fill("12")
    input_field.press("Enter")
    expect(page.get_by_text("square of x: 144")).to_be_visible(timeout=30_000)


SHINY_APP = """\
library(shiny)
ui <- fluidPage(numericInput("x", "x", 3), textOutput("square"))
server <- function(input, output) {
  output$square <- renderText(paste("square of x:", input$x * input$x))
}
shinyApp(ui, server)
"""


def shiny_squares_its_input(page: Any, workspace: Path) -> None:
    """Shiny: the app shows x², for the default x and for one typed in."""
    expect(page.locator("#square")).to_have_text("square of x: 9", timeout=60_000)
    page.locator("#x").fill("12")
    expect(page.locator("#square")).to_have_text("square of x: 144", timeout=30_000)


#: Each built-in tool (but JupyterLab) and what its browser test does in it.
USES = {
    "vscode": ToolUse("vscode", vscode_terminal_writes_a_file_and_the_editor_opens_it, timeout=120),
    "desktop": ToolUse(
        "desktop",
        desktop_shows_a_screen_and_its_xterm_takes_keys,
        params={"geometry": "1024x768"},
        timeout=60,
    ),
    "streamlit": ToolUse(
        "streamlit",
        streamlit_squares_its_input,
        params={"app": "apps/square.py"},
        files={"apps/square.py": STREAMLIT_APP},
    ),
    "shiny": ToolUse(
        "shiny", shiny_squares_its_input, params={"app": "square.R"}, files={"square.R": SHINY_APP}
    ),
}
