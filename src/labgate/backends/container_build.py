"""``labgate image build``: build a tool's image on a site's engine from the tool's recipe.

A tool's ``[container]`` table may name ``build``: a directory next to its
tool file holding a ``Containerfile`` (and whatever it copies). The build
context is a copy of that directory plus ``extra-ca.pem`` (``--ca-file``,
else empty), ``pip-venv.sh`` (a venv from PyPI that trusts it) and
``labgate/`` with labgate's busy report extension
(``labgate.tools.jupyter_busy``), token gate (``labgate.tools.gate``) and
desktop launcher (``labgate.tools.desktop``), standard library only, so an
image can run them without installing labgate. The image is tagged with the
table's ``image`` and built by the site's engine (Docker or Podman, through
the Engine API), which pulls ``FROM`` images only when it must: on machines
that cannot reach a public registry, pass a local base
(``--build-arg BASE=...``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labgate.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from labgate.backends.containers import ContainerBackend
    from labgate.tools.catalog import Tool

CONTAINERFILE = "Containerfile"
#: CA certificates the build trusts besides the base image's (``--ca-file``); may be empty.
EXTRA_CA = "extra-ca.pem"
#: Files of labgate an image may run without installing it (copied into ``labgate/``).
LABGATE_FILES = (
    "__init__.py",
    "aio.py",
    "tools/__init__.py",
    "tools/jupyter_busy.py",
    "tools/jupyter_start.py",
    "tools/gate.py",
    "tools/ports.py",
    "tools/desktop.py",
)
PACKAGE = Path(__file__).resolve().parent.parent
#: ``pip-venv.sh VENV REQUIREMENT...``, in every context: a venv from PyPI, trusting extra-ca.pem.
PIP_VENV = PACKAGE / "tools" / "builtin" / "pip-venv.sh"


def recipe_of(backend: ContainerBackend, tool: Tool) -> tuple[str, Path]:
    """The image a tool's recipe builds and the recipe's directory; ConfigError without one."""
    section = backend.tool_section_of(tool)
    if section is None:
        raise ConfigError(f"tool {tool.name!r} has no [container] table")
    if not section.build:
        raise ConfigError(
            f'tool {tool.name!r} names no build recipe ([container] build = "<directory>"): '
            f"pull its image {section.image} instead"
        )
    if not tool.source:
        raise ConfigError(f"tool {tool.name!r} has no tool file to find its recipe next to")
    directory = (Path(tool.source).parent / section.build).resolve()
    if not (directory / CONTAINERFILE).is_file():
        raise ConfigError(f"tool {tool.name!r}: no {CONTAINERFILE} in {directory}")
    return section.image, directory


def write_context(directory: Path, root: Path, ca_file: Path | None = None) -> None:
    """Fill ``root`` with a build context: the recipe, ``extra-ca.pem`` and ``labgate/``.

    ``scripts/build-tool-images.sh`` builds the tests' images from the same context.
    """
    shutil.copytree(directory, root, dirs_exist_ok=True)
    extra = ca_file.read_bytes() if ca_file is not None else b""
    (root / EXTRA_CA).write_bytes(extra)
    shutil.copy(PIP_VENV, root / PIP_VENV.name)
    for name in LABGATE_FILES:
        target = root / "labgate" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE / name, target)


def build_image(
    backend: ContainerBackend,
    tool: Tool,
    build_args: dict[str, str],
    say: Callable[[str], None],
    *,
    tag: str = "",
    ca_file: Path | None = None,
) -> str:
    """Build ``tool``'s image on the backend's engine (blocking); returns the image tag.

    ``say`` gets the engine's build output, line by line. ``ca_file`` is put in
    the context as ``extra-ca.pem`` (empty without one), for recipes that must
    trust a TLS-intercepting proxy's CA while they download. Raises
    :class:`BackendError` with the engine's words when the build fails.
    """
    image, directory = recipe_of(backend, tool)
    image = tag or image
    with tempfile.TemporaryDirectory(prefix="labgate-build-") as context:
        root = Path(context)
        write_context(directory, root, ca_file)
        say(f"building {image} on {backend.engine_address} from {directory}")
        lines = backend.client.api.build(
            path=str(root),
            dockerfile=CONTAINERFILE,
            tag=image,
            buildargs=build_args or None,
            rm=True,
            forcerm=True,
            decode=True,
            labels={"org.labgate.tool": tool.name},
        )
        for line in lines:
            problem = _problem(line)
            if problem:
                raise BackendError(f"building {image} failed: {problem}")
            text = str(line.get("stream") or line.get("status") or "").rstrip()
            if text:
                say(text)
    if not backend.has_image(image):
        raise BackendError(f"the engine built nothing tagged {image}")
    return image


def _problem(line: dict[str, Any]) -> str:
    detail = line.get("errorDetail") or {}
    return str(line.get("error") or detail.get("message") or "").strip()
