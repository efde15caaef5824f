"""labgate.tools.jupyter_start: JupyterLab's server without the IRI grammars it never uses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("jupyterlab", reason="pip install 'labgate[jupyter]' (make test does)")

# What the server imports that leads to jsonschema's format checkers, then what they hold.
PROBE = """
import json, sys
{prelude}
import jupyter_events.validators
from jsonschema import Draft7Validator
from jupyter_events.schema import EventSchema
checkers = Draft7Validator.FORMAT_CHECKER.checkers
schema = EventSchema({{
    "$id": "https://labgate.example/event", "version": "1", "type": "object",
    "properties": {{"url": {{"type": "string", "format": "uri"}}}},
}})
schema.validate({{"url": "https://example.org/"}})
print(json.dumps({{
    "loaded": sys.modules.get("rfc3987_syntax") is not None,
    "iri": "iri" in checkers,
    "uri": "uri" in checkers,
    "date-time": "date-time" in checkers,
}}))
"""


def probe(prelude: str) -> dict[str, bool]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(prelude=prelude)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(done.stdout))


def test_the_server_skips_only_the_iri_checkers_and_still_validates_events():
    plain = probe("")
    skipped = probe("from labgate.tools.jupyter_start import skip_unused; skip_unused()")
    assert skipped["loaded"] is False and skipped["iri"] is False
    # Every other checker stays as it is without labgate.
    assert skipped["uri"] == plain["uri"] and skipped["date-time"] == plain["date-time"]
    if plain["loaded"]:  # installed here (jsonschema[format-nongpl]): the plain import pays
        assert plain["iri"] is True


def test_it_is_jupyterlabs_own_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "labgate.tools.jupyter_start", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    import jupyterlab

    assert done.stdout.strip() == jupyterlab.__version__
