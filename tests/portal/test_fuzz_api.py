"""The API is what its OpenAPI document says: a schema-driven fuzzer against the real server.

schemathesis reads ``/api/v1/openapi.json`` from a portal served by uvicorn
on a random loopback port and sends every operation requests made from the
document, as an admin and as a plain user: valid ones (positive) and ones
that break it (negative: wrong types, missing or unknown fields). Every
answer must be below 500, have a documented status and content type, and a
body that matches the documented schema; every negative request must be
refused with a 4xx. Examples are derandomized (the same requests each run)
and few per operation, so the run is bounded and CI stable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from helpers import PASSWORD, fresh_database_url
from live_server import LiveServer, live_server

pytestmark = pytest.mark.slow

#: Examples per operation, principal and mode: enough to cross each operation's
#: validation, few enough that the whole run stays near a minute.
POSITIVE_EXAMPLES = 6
NEGATIVE_EXAMPLES = 4
#: The run must end in this many seconds, whatever the machine.
BUDGET = 240.0

#: Operations left out, and why.
EXCLUDED = {
    # Server-Sent Events until the instance ends: a request may never finish.
    ("GET", "/api/v1/instances/{instance_id}/events"),
    # The route table, then every change, for as long as the router listens.
    ("GET", "/api/v1/router/stream"),
}
FUZZ_USER = "fuzzer"


@dataclass(frozen=True)
class Caller:
    """Who sends the requests, and what the fuzzer must not take from them."""

    name: str
    headers: dict[str, str]
    token_id: int


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The portal on a random loopback port for the whole module (PostgreSQL if configured)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    with fresh_database_url(tmp) as url, live_server(tmp, database_url=url) as running:
        yield running


def _token(http: httpx.Client, username: str, password: str) -> tuple[str, int]:
    login = http.post("/api/v1/auth/login", json={"username": username, "password": password})
    login.raise_for_status()
    created = http.post(
        "/api/v1/tokens",
        json={"note": "fuzz", "scopes": login.json()["scopes"]},
        headers={"X-CSRF-Token": login.json()["csrf_token"]},
    )
    created.raise_for_status()
    http.cookies.clear()
    return str(created.json()["token"]), int(created.json()["id"])


@pytest.fixture(scope="module")
def callers(server: LiveServer) -> dict[str, Caller]:
    """An admin (every scope) and a plain user (every scope a user may hold)."""
    from live_server import ADMIN_PASSWORD

    with httpx.Client(base_url=server.url) as http:
        admin, admin_id = _token(http, "admin", ADMIN_PASSWORD)
        made = http.post(
            "/api/v1/users",
            json={"name": FUZZ_USER, "password": PASSWORD},
            headers={"Authorization": f"token {admin}"},
        )
        made.raise_for_status()
        user, user_id = _token(http, FUZZ_USER, PASSWORD)
    return {
        "admin": Caller("admin", {"Authorization": f"token {admin}"}, admin_id),
        "user": Caller(FUZZ_USER, {"Authorization": f"token {user}"}, user_id),
    }


@pytest.fixture(scope="module")
def api(server: LiveServer) -> Any:
    """The served OpenAPI document, loaded by schemathesis."""
    return schemathesis.openapi.from_url(f"{server.url}/api/v1/openapi.json")


def _spares_the_callers(case: Any, callers: dict[str, Caller]) -> bool:
    """Whether a generated request leaves the fuzzer's own accounts and tokens alone.

    Deleting, disabling or re-passwording ``me``, ``admin`` or ``fuzzer``, or
    revoking the tokens in use, would turn every later request into a 401 and
    hide what the rest of the run would find.
    """
    if case.method == "GET":
        return True
    protected = {"me", *(caller.name for caller in callers.values())}
    values = {str(value) for value in (case.path_parameters or {}).values()}
    if case.path.startswith("/api/v1/users/") and values & protected:
        return False
    ids = {str(caller.token_id) for caller in callers.values()}
    return not (case.path.startswith("/api/v1/tokens/") and values & ids)


def _runner(
    cases: Any,
    examples: int,
    base_url: str,
    session: requests.Session,
    caller: Caller,
    checks: list[Any],
) -> Any:
    """A derandomized hypothesis test sending ``examples`` cases and checking each answer."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=caller.headers)
        case.validate_response(response, checks=checks)

    return run


def _gist(failure: BaseException) -> str:
    """What went wrong and how to send the request again, from a schemathesis report."""
    lines = [line.strip() for line in str(failure).splitlines() if line.strip()]
    keep = [line for line in lines if line.startswith(("- ", "Received", "`", "curl"))]
    return "\n    ".join(keep or lines[:8])


def _fuzz(
    api: Any, base_url: str, caller: Caller, callers: dict[str, Caller], deadline: float
) -> list[str]:
    """Run every operation as ``caller``; returns the problems found, one line each."""
    problems: list[str] = []
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    session = requests.Session()
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 40, "the fuzzer found too few operations in the document"
    for operation in operations:
        if (operation.method.upper(), operation.path) in EXCLUDED:
            continue
        for mode, examples in (
            (GenerationMode.POSITIVE, POSITIVE_EXAMPLES),
            (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES),
        ):
            assert time.monotonic() < deadline, f"the fuzzer ran over {BUDGET} s"
            extra = [negative_data_rejection] if mode is GenerationMode.NEGATIVE else []
            cases = operation.as_strategy(generation_mode=mode).filter(
                lambda case: _spares_the_callers(case, callers)
            )

            run = _runner(cases, examples, base_url, session, caller, [*checks, *extra])
            try:
                run()
            except Unsatisfiable:
                # Nothing in the operation can be made invalid (no body, no typed parameter).
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, FailureGroup) as failure:  # one per operation, then the next
                problems.append(
                    f"{operation.label} [{mode.value}, {caller.name}]: {_gist(failure)}"
                )
    return problems


@pytest.mark.parametrize("who", ["admin", "user"])
def test_every_operation_answers_as_documented(
    server: LiveServer, api: Any, callers: dict[str, Caller], who: str
) -> None:
    deadline = time.monotonic() + BUDGET
    problems = _fuzz(api, server.url, callers[who], callers, deadline)
    assert not problems, "\n\n".join(problems)
    # The callers survived the run: the fuzzer exercised what it was meant to.
    for caller in callers.values():
        seen = httpx.get(f"{server.url}/api/v1/auth/session", headers=caller.headers)
        assert seen.status_code == 200, seen.text


def test_the_fuzzer_sees_a_misdocumented_answer(server: LiveServer, api: Any) -> None:
    """The checks bite: a status the document does not list for the operation is reported."""
    case = api["/api/v1/tools/{name}"]["GET"].Case(path_parameters={"name": "demo"})
    refused = case.call(base_url=server.url, headers={"Authorization": "token nope"})
    assert refused.status_code == 401
    case.validate_response(refused, checks=[status_code_conformance, response_schema_conformance])
    # The root answers only 200 by its document: the same 401 as its answer is a finding.
    root = api["/api/v1"]["GET"].Case()
    with pytest.raises(FailureGroup) as found:
        root.validate_response(refused, checks=[status_code_conformance])
    assert "Undocumented status code" in str(found.value.exceptions[0])
