"""The ``desktop`` tool: a Linux desktop in the browser (TigerVNC, Openbox, noVNC, websockify).

``python -m labgate.tools.desktop --port P --geometry 1280x800`` starts, in
one process group (the process backend stops them together):

1. ``Xtigervnc``: a virtual X server that is also a VNC server. Its VNC side
   listens on a Unix socket in a private directory (mode 0700), never on TCP.
   Its X side never listens on TCP and takes only clients holding a random
   cookie (``-auth``, the ``Xauthority`` file in that directory, which the
   desktop's own programs get through ``XAUTHORITY``): another user's
   instance or a local account would otherwise type into the desktop's
   terminal (XTEST) and run commands as the instance's user. It listens on
   both sockets of its display: ``/tmp/.X11-unix/X<n>`` in the instance's
   own ``/tmp`` *and* the abstract ``@/tmp/.X11-unix/X<n>``, which lives in
   the network namespace that sandboxed instances share with the host, and
   which X clients (libxcb) try first. Were the abstract name left free,
   anyone could take it with an X server of their own, and the desktop's
   window manager and terminal would open on that server instead (sending it
   the cookie). Someone who holds a display's abstract name only pushes the
   desktop to another number (``-displayfd`` skips it), and the desktop
   refuses to start unless its own X server answers on both sockets of the
   display it got (:func:`foreign_display`), so ``DISPLAY=:<n>`` leads to
   it and nowhere else;
2. ``openbox``, a light window manager, which starts an ``xterm`` in the workspace;
3. ``websockify`` on the loopback port ``P`` (``--host 0.0.0.0`` in a container,
   whose network namespace is its own): it serves noVNC's pages and
   turns the WebSocket at ``/websockify`` into the VNC stream. An auth plugin
   (written next to the socket) refuses every request without the router's
   ``Authorization: token <instance token>``, so only traffic that came
   through labgate gets in.

The landing page (``/``) sends the browser on to noVNC's ``vnc.html`` with
``autoconnect``, ``resize=remote`` (the desktop follows the browser window)
and the WebSocket path under the instance's prefix; noVNC's side bar has the
clipboard. The tool file is ``builtin/desktop.toml``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOVNC_DIRS = (Path("/usr/share/novnc"),)
#: Programs the desktop needs; the tool file's ``requires`` names the same.
PROGRAMS = ("Xtigervnc", "openbox", "xterm", "websockify")

LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Desktop</title>
<script src="labgate-desktop.js"></script></head>
<body><p>Opening the desktop… <a id="go" href="vnc.html">Open it</a></p></body></html>
"""
# The WebSocket path is absolute from the host's root: noVNC adds nothing to it.
LANDING_JS = """"use strict";
(function () {
  var base = location.pathname.replace(/[^/]*$/, "").replace(/^\\//, "");
  var query = "autoconnect=1&reconnect=1&resize=remote&show_dot=1&path=" +
    encodeURIComponent(base + "websockify");
  location.replace("vnc.html?" + query);
})();
"""
AUTH_PLUGIN = '''"""websockify auth plugin: only requests with the instance token."""
import hmac
import os

from websockify.auth_plugins import AuthenticationError


class TokenAuth:
    def __init__(self, src=None):
        self.expected = "token " + os.environ.get("LABGATE_INSTANCE_TOKEN", "")

    def authenticate(self, headers, target_host, target_port):
        given = headers.get("Authorization") or ""
        if len(self.expected) <= len("token ") or not hmac.compare_digest(given, self.expected):
            raise AuthenticationError(response_code=403, response_msg="Forbidden")
'''


def novnc_dir() -> Path | None:
    """Where noVNC's pages are installed, if anywhere."""
    return next((d for d in NOVNC_DIRS if (d / "vnc.html").is_file()), None)


def web_root(private: Path, novnc: Path) -> Path:
    """noVNC's files (linked) plus the landing page, in a directory of the instance's own."""
    web = private / "web"
    web.mkdir()
    for entry in novnc.iterdir():
        (web / entry.name).symlink_to(entry)
    (web / "index.html").write_text(LANDING)
    (web / "labgate-desktop.js").write_text(LANDING_JS)
    return web


def wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until ``path`` exists; exit when ``process`` dies first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            sys.exit(f"desktop: the VNC server exited with {process.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"desktop: {path} did not appear within {timeout:g}s")
        time.sleep(0.05)


def read_display(fd: int, process: subprocess.Popen[bytes], timeout: float = 20) -> str:
    """The display number the X server wrote to ``fd`` once ready (``-displayfd``)."""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    text = b""
    while not text.endswith(b"\n"):
        if process.poll() is not None:
            sys.exit(f"desktop: Xtigervnc exited with {process.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"desktop: no X display within {timeout:g}s")
        try:
            text += os.read(fd, 16)
        except BlockingIOError:
            time.sleep(0.05)
    os.close(fd)
    return f":{int(text)}"


#: Where X clients look for display ``:<n>``, in the order libxcb tries them: the abstract
#: name first, in the network namespace (shared with the host and every other instance),
#: then the file in the instance's own ``/tmp``. (Fixed names: where X puts them.)
X_SOCKETS = ("\0/tmp/.X11-unix/X{n}", "/tmp/.X11-unix/X{n}")  # noqa: S108


def foreign_display(display: str, server_pid: int) -> str | None:
    """Why ``display`` is not the desktop's own, or ``None`` when it is.

    Connects to each socket an X client would use for ``DISPLAY=display``
    and asks the kernel who listens there (``SO_PEERCRED``: the pid that
    called ``listen``, 0 for a process outside this pid namespace). Were it
    anyone but the desktop's X server (``server_pid``), the desktop's
    programs would open their windows on a stranger's X server, hand it the
    cookie and take keys from it.
    """
    number = int(display.lstrip(":"))
    for template in X_SOCKETS:
        address = template.format(n=number)
        shown = address.replace("\0", "@")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            try:
                sock.connect(address)
            except OSError as exc:
                return f"nothing answers on {shown} for display {display}: {exc}"
            credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = struct.unpack("3i", credentials)[0]
        if pid != server_pid:
            return (
                f"{shown} (display {display}) belongs to another process (pid {pid}),"
                f" not to the desktop's X server (pid {server_pid})"
            )
    return None


#: The ``Xauthority`` family that matches any address (a cookie for this display wherever).
FAMILY_WILD = 0xFFFF


def write_xauthority(path: Path, cookie: bytes) -> None:
    """Write an ``Xauthority`` file (mode 0600) holding ``cookie`` as an MIT-MAGIC-COOKIE-1.

    One entry of the family that matches any address and any display number
    (empty fields): the X server takes its cookie from it (``-auth``), and
    the desktop's programs find it through ``XAUTHORITY``. The format is
    libXau's: a 16-bit family, then four length-prefixed fields.
    """
    fields = (b"", b"", b"MIT-MAGIC-COOKIE-1", cookie)
    entry = struct.pack(">H", FAMILY_WILD) + b"".join(
        struct.pack(">H", len(field)) + field for field in fields
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(entry)


def main(argv: list[str] | None = None) -> None:
    """Start the desktop and serve it on ``--port`` until stopped."""
    parser = argparse.ArgumentParser(description="labgate desktop tool")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--geometry", default="1280x800")
    args = parser.parse_args(argv)
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    novnc = novnc_dir()
    if missing or novnc is None:
        sys.exit(f"desktop: missing {', '.join(missing) or 'noVNC (/usr/share/novnc)'}")

    private = Path(tempfile.mkdtemp(prefix="labgate-desktop-"))
    private.chmod(0o700)
    vnc_socket = private / "vnc.sock"
    xauthority = private / "Xauthority"
    write_xauthority(xauthority, secrets.token_bytes(16))
    (private / "labgate_desktop_auth.py").write_text(AUTH_PLUGIN)
    web = web_root(private, novnc)
    children: list[subprocess.Popen[bytes]] = []

    def shut_down() -> None:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(private, ignore_errors=True)

    def stop(*_: object) -> None:
        shut_down()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    read_end, write_end = os.pipe()
    xvnc = [
        "Xtigervnc",
        "-displayfd",
        str(write_end),
        "-geometry",
        args.geometry,
        "-depth",
        "24",
        "-rfbport",
        "-1",
        "-rfbunixpath",
        str(vnc_socket),
        "-SecurityTypes",
        "None",
        "-AlwaysShared",
        # TCP never; the Unix sockets, both the file and the abstract name, are the display's.
        "-nolisten",
        "tcp",
        "-auth",
        str(xauthority),
    ]
    children.append(subprocess.Popen(xvnc, pass_fds=(write_end,)))
    os.close(write_end)
    display = read_display(read_end, children[0])
    if (problem := foreign_display(display, children[0].pid)) is not None:
        shut_down()
        sys.exit(f"desktop: {problem}: not starting")
    wait_for(vnc_socket, children[0])
    env = {**os.environ, "DISPLAY": display, "XAUTHORITY": str(xauthority)}
    # Openbox starts the xterm once it manages the screen, so the xterm is placed and
    # focused: an xterm mapped before the window manager stayed unfocused, and keys
    # typed into the desktop went nowhere.
    children.append(subprocess.Popen(["openbox", "--startup", "xterm -title Terminal"], env=env))
    websockify = [
        "websockify",
        "--web",
        str(web),
        "--web-auth",
        "--auth-plugin",
        "labgate_desktop_auth.TokenAuth",
        "--unix-target",
        str(vnc_socket),
        f"{args.host}:{args.port}",
    ]
    path = os.pathsep.join(filter(None, [str(private), os.environ.get("PYTHONPATH", "")]))
    children.append(subprocess.Popen(websockify, env={**os.environ, "PYTHONPATH": path}))
    print(f"desktop: {display} ({args.geometry}) on {args.host}:{args.port}", flush=True)
    while all(child.poll() is None for child in children[:1] + children[-1:]):
        time.sleep(0.5)
    stop()


if __name__ == "__main__":
    main()
