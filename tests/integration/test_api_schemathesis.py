"""The whole OpenAPI, fuzzed by schemathesis against the running api, as a developer, a platform user and
the admin token: no answer is a 5xx, every status is one the operation documents, and every answer
matches its documented schema.

Bounded and repeatable: a fixed number of examples per operation, derandomized (the same cases every
run), no shrinking. Each operation is called with the callers its security allows: admin operations
with the admin token, user operations as a developer and as a platform user, catalog reads by all three.
`rotate-key` gets a fresh user for every call (it revokes the key it is called with).

Then a stateful run: schemathesis chains operations through the links it infers from the document (list
grants → get, change, revoke one; list models → their versions and uploads; ...), with the same checks.
"""

from __future__ import annotations

import functools
import os
import uuid

import httpx
import hypothesis
import pytest
import schemathesis
from conftest import ADMIN_TOKEN, Account, Registry
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from registry_api.app import create_app

API_BASE_URL = os.environ.get("API_BASE_URL", "http://127.0.0.1:8081")
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def _schema():
    """The api's OpenAPI document as its code builds it (collection needs no running api; the test below
    checks the running api serves the same document), with the calls going to the running api."""
    schema = schemathesis.openapi.from_dict(create_app().openapi())
    schema.config.update(base_url=API_BASE_URL, request_timeout=30)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=MAX_EXAMPLES,
        deterministic=True,
        no_shrink=True,
        with_security_parameters=False,  # the callers below bring real credentials
    )
    return schema


# The Hub's ndjson commit (/hf/api/models/.../commit/...) is documented as a string body of this media type:
# sent as its UTF-8 text, as for text/plain.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")

schema = _schema()


def test_the_running_api_serves_the_fuzzed_document(registry):
    assert registry.http.get("/openapi.json").json() == create_app().openapi()


@pytest.fixture(scope="session")
def callers(registry: Registry) -> dict[str, dict[str, str]]:
    dev = registry.register("Fuzz")
    plat = registry.create_user("platform", "FuzzPlat")
    # Something for the fuzzed ids and repo ids to find: a model with a version, and a grant of it.
    repo = registry.create_model(dev, "private")
    registry.create_version(dev, repo, "v1")
    registry.grant(plat, repo)
    return {"developer": dev.headers, "platform": plat.headers, "admin": registry.admin}


_turns: dict[str, int] = {}


def _caller_of(case, callers: dict[str, dict[str, str]]) -> dict[str, str]:
    """The caller of this case: in turn, each caller the operation's security allows (deterministic: the
    cases come in the same order every run)."""
    schemes = {name for requirement in case.operation.definition.raw.get("security", []) for name in requirement}
    allowed = []
    if "ApiKey" in schemes:
        allowed += [callers["developer"], callers["platform"]]
    if "AdminToken" in schemes:
        allowed.append(callers["admin"])
    if not allowed:
        return {}
    turn = _turns[case.operation.label] = _turns.get(case.operation.label, -1) + 1
    return allowed[turn % len(allowed)]


def _fresh_key(registry: Registry) -> dict[str, str]:
    account: Account = registry.register("FuzzRotate")
    return account.headers


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
def test_api_contract(case, callers, registry):
    if case.operation.path == "/v1/users/rotate-key":
        headers = _fresh_key(registry)
    else:
        headers = _caller_of(case, callers)
    case.call_and_validate(headers=headers, checks=CHECKS)


# ---------------------------------------------------------------- stateful: chains of operations


@functools.cache
def _workflow_callers() -> dict[str, dict[str, str]]:
    email = f"fuzz-flow-{uuid.uuid4().hex[:12]}@example.com"
    r = httpx.post(f"{API_BASE_URL}/v1/users/register", json={"email": email, "name": "FuzzFlow"}, timeout=30)
    assert r.status_code == 200, r.text
    return {"developer": {"x-api-key": r.json()["api_key"]}, "admin": {"x-admin-token": ADMIN_TOKEN}}


class Workflow(schema.exclude(path="/v1/users/rotate-key").as_state_machine()):
    """Each step as a developer (user and catalog operations) or with the admin token (admin operations)."""

    def get_call_kwargs(self, case) -> dict:
        schemes = {name for requirement in case.operation.definition.raw.get("security", []) for name in requirement}
        callers = _workflow_callers()
        if "ApiKey" in schemes:
            return {"headers": callers["developer"]}
        if "AdminToken" in schemes:
            return {"headers": callers["admin"]}
        return {}

    def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
        case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)


TestWorkflow = Workflow.TestCase
TestWorkflow.settings = hypothesis.settings(
    max_examples=15,
    stateful_step_count=6,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
