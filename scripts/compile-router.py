"""Compile the router's hot path with mypyc into src/labgate/router/native/.

    .venv/bin/python scripts/compile-router.py          # only when the sources changed
    .venv/bin/python scripts/compile-router.py --force  # always
    .venv/bin/python scripts/compile-router.py --remove # back to the Python sources

``make run`` and ``make test`` run it. The modules are those of
``labgate.router._native.MODULES``; the router uses the extensions only while
every source hashes to what the manifest (``native/SOURCES.json``) says they
were built from, so an edited module falls back to its Python source until
this runs again. Needs mypy (the dev extras) and a C compiler; without them it
says so and the router runs its Python sources.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from labgate.router import _native  # noqa: E402

BUILD = """
import sys
from setuptools import Extension, setup
from mypyc.build import mypycify

paths = [path for path in sys.argv[1:] if path.endswith(".py")]
c_sources = [path for path in sys.argv[1:] if path.endswith(".c")]
sys.argv[1:] = ["--quiet", "build_ext", "--build-lib", "out", "--build-temp", "tmp"]
hand_written = [
    Extension(
        "labgate.router." + source.rpartition("/")[2][:-2],
        [source],
        extra_compile_args=["-O2", "-Wall"],
    )
    for source in c_sources
]
setup(
    name="labgate-router-native",
    ext_modules=mypycify(paths, opt_level="3", group_name="labgate.router.native") + hand_written,
)
"""


def build(force: bool) -> int:
    if not force and _native.check() == "compiled":
        _native.MANIFEST.touch()  # for make: checked now
        print("router: compiled modules are up to date")
        return 0
    try:
        import mypyc  # noqa: F401
    except ImportError:
        print("router: mypy is not installed (pip install -e '.[dev]'): the router runs Python")
        return 0
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        print("router: no C compiler (apt-get install build-essential): the router runs Python")
        return 0
    router = ROOT / "src/labgate/router"
    sources = [str(router / f"{name}.py") for name in _native.MODULES]
    sources += [str(router / f"{name}.c") for name in _native.C_MODULES]
    hashes = _native.source_hashes()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labgate-native-") as work:
        (Path(work) / "build.py").write_text(BUILD)
        done = subprocess.run(
            [sys.executable, "build.py", *sources],
            cwd=work,
            # labgate's own modules from this checkout, whatever is installed meanwhile.
            env={**os.environ, "MYPYPATH": str(ROOT / "src")},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            print("router: compiling failed; the router runs its Python sources", file=sys.stderr)
            return 1
        built = Path(work) / "out/labgate/router"
        remove()
        _native.NATIVE_DIR.mkdir()
        for extension in built.iterdir():
            shutil.copy2(extension, _native.NATIVE_DIR / extension.name)
    manifest = {"python": sys.version.split()[0], "sources": hashes}
    _native.MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    took = time.monotonic() - started
    print(f"router: compiled {len(sources)} modules (mypyc and C) in {took:.0f} s")
    return 0


def remove() -> None:
    """Delete the compiled modules: the router runs its Python sources."""
    shutil.rmtree(_native.NATIVE_DIR, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="compile even when up to date")
    parser.add_argument("--remove", action="store_true", help="delete the compiled modules")
    args = parser.parse_args()
    if args.remove:
        remove()
        print("router: compiled modules removed; the router runs its Python sources")
        return 0
    return build(args.force)


if __name__ == "__main__":
    sys.exit(main())
