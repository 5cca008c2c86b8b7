"""The published OpenAPI schema: checked in, up to date, and field for field the client's protocol.

The server imports its wire models from `espo_client.protocol`, so a drift shows up in three ways,
each caught here: docs/openapi.json not regenerated after a model changed (`make openapi`), a
route answering with a model that is not the client's, or the rule's parameters and their wire
overrides (`RuleParams`) parting ways.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path

import pytest
from pydantic import BaseModel

from espo_client import openai_protocol, protocol
from espo_client.stop_rule import EspoParams
from espo_server.openapi import openapi_json, openapi_schema

DOCS = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"

ROUTES = {
    "/v1/rollouts": {"post"},
    "/v1/espo/state": {"get", "put"},
    "/v1/espo/commit": {"post"},
    "/v1/weights": {"post"},
    "/v1/weights/files": {"get"},
    "/v1/weights/files/{name}": {"get"},
    "/v1/critic/weights/files": {"get"},
    "/v1/info": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
    "/v1/models": {"get"},
    "/v1/completions": {"post"},
    "/v1/chat/completions": {"post"},
}
PUBLISHED = {
    "CommitRequest",
    "ErrorBody",
    "ErrorResponse",
    "EspoState",
    "HealthResponse",
    "InfoResponse",
    "Prompt",
    "RolloutRequest",
    "RolloutResponse",
    "RuleParams",
    "StateResponse",
    "StopRule",
    "Traces",
    "Trajectory",
    "Usage",
    "Carried",
    "VersionSpan",
    "GroupEvent",
    "RunRequest",
    "RunResponse",
    "WeightFile",
    "WeightFilesResponse",
    "WeightsRequest",
    "WeightsResponse",
}
"""Protocol models (and the StopRule enum) the server's routes must publish."""
PUBLISHED_OPENAI = {
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "EspoChoice",
    "ModelList",
}
"""The OpenAI-compatible routes' models (espo_client.openai_protocol)."""
FASTAPI_OWN = {"HTTPValidationError", "ValidationError"}
"""Components FastAPI adds by itself (its default 422 answer), not part of espo_client.protocol."""


@pytest.fixture(scope="module")
def fresh() -> dict:
    return openapi_schema()


@pytest.fixture(scope="module")
def committed() -> dict:
    assert DOCS.exists(), f"{DOCS} is missing: run `make openapi`"
    return json.loads(DOCS.read_text())


def test_committed_schema_is_up_to_date(fresh, committed):
    assert committed == fresh, "docs/openapi.json is stale: run `make openapi` and commit it"
    assert DOCS.read_text() == openapi_json(), "docs/openapi.json is not in `make openapi`'s format"


def test_main_prints_the_schema(capsys):
    from espo_server.openapi import main

    assert main() == 0
    assert json.loads(capsys.readouterr().out) == openapi_schema()


def test_schema_lists_the_routes(fresh):
    paths = {path: set(ops) for path, ops in fresh["paths"].items()}
    for path, methods in ROUTES.items():
        assert path in paths, f"{path} missing from the schema"
        assert methods <= paths[path], f"{path}: {sorted(paths[path])}, expected {sorted(methods)}"


def _links(schema: dict) -> dict[tuple[str, str, str], dict]:
    """(method, path, status) of an answer -> its links."""
    return {
        (method.upper(), path, status): response["links"]
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        for status, response in operation.get("responses", {}).items()
        if "links" in response
    }


def test_ids_handed_out_link_to_the_routes_that_take_them(fresh):
    """An opened upload's id (policy's and critic's) and an opened run's id link to every operation
    that takes it; each link names an operation that exists and sets a path parameter it has from
    a required property of the answer's model."""
    operations = {
        operation["operationId"]: (path, operation)
        for path, item in fresh["paths"].items()
        for operation in item.values()
    }
    links = _links(fresh)
    for prefix in ("/v1/weights/uploads", "/v1/critic/weights/uploads"):
        opened = links[("POST", prefix, "201")]
        targets = {operations[link["operationId"]][0] for link in opened.values()}
        assert targets == {f"{prefix}/{{upload_id}}", f"{prefix}/{{upload_id}}/commit",
                           f"{prefix}/{{upload_id}}/shards/{{shard}}"}, targets  # fmt: skip
        assert len(opened) == 4  # GET and DELETE of the upload, a shard, the commit
        assert ("PUT", f"{prefix}/{{upload_id}}/shards/{{shard}}", "200") in links  # a shard -> the commit
    opened_run = links[("POST", "/v1/runs", "200")]
    assert {operations[link["operationId"]][0] for link in opened_run.values()} == {"/v1/runs/{run_id}"}
    assert len(opened_run) == 2  # GET and DELETE
    components = fresh["components"]["schemas"]
    for (method, path, status), named in links.items():
        model = fresh["paths"][path][method.lower()]["responses"][status]["content"]["application/json"]
        required = components[model["schema"]["$ref"].rsplit("/", 1)[1]]["required"]
        for link in named.values():
            target_path, target = operations[link["operationId"]]
            path_parameters = {p["name"] for p in target.get("parameters", []) if p["in"] == "path"}
            for parameter, expression in link["parameters"].items():
                assert parameter in path_parameters and f"{{{parameter}}}" in target_path, (link, target_path)
                assert expression == f"$response.body#/{parameter}" and parameter in required, link


def _model_name(component: str) -> str:
    """FastAPI names a model `X-Input` / `X-Output` when its request and response schemas differ."""
    for suffix in ("-Input", "-Output"):
        if component.endswith(suffix):
            return component[: -len(suffix)]
    return component


@pytest.mark.parametrize("which", ["fresh", "committed"])
def test_components_are_the_client_protocol_models(which, request):
    schema = request.getfixturevalue(which)
    components = schema["components"]["schemas"]
    published = {_model_name(name) for name in components} - FASTAPI_OWN
    wanted = PUBLISHED | PUBLISHED_OPENAI
    assert wanted <= published, f"not published: {sorted(wanted - published)}"
    for name, component in components.items():
        model_name = _model_name(name)
        if model_name in FASTAPI_OWN:
            continue
        module = protocol if model_name in protocol.__all__ else openai_protocol
        model = getattr(module, model_name, None)
        assert model is not None and model_name in module.__all__, (
            f"component {name} is not a model of espo_client.protocol or espo_client.openai_protocol"
        )
        if isinstance(model, type) and issubclass(model, Enum):
            assert component["enum"] == [member.value for member in model], name
            continue
        if model is protocol.RolloutStreamEvent:  # the NDJSON union: one member per event model
            members = {ref["$ref"].rsplit("/", 1)[-1] for ref in component["oneOf"]}
            assert members == {"TrajectoryEvent", "GroupEvent", "DoneEvent", "ErrorEvent"}, members
            continue
        properties = set(component.get("properties", {}))
        required = set(component.get("required", []))
        if dataclasses.is_dataclass(model):  # EspoState: the stop rule's own dataclass, on the wire
            assert properties == {f.name for f in dataclasses.fields(model)}, name
            assert required == set(), name  # every field has a default
            continue
        assert isinstance(model, type) and issubclass(model, BaseModel), name
        fields = {field.alias or field_name for field_name, field in model.model_fields.items()}
        assert properties == fields, (
            f"{name}: only in the schema {sorted(properties - fields)}, "
            f"only in the client's {model_name} {sorted(fields - properties)}"
        )
        assert required == {n for n, f in model.model_fields.items() if f.is_required()}, name


def test_rule_params_mirror_espo_params():
    wire = set(protocol.RuleParams.model_fields)
    maths = {field.name for field in dataclasses.fields(EspoParams)}
    assert wire == maths, (
        f"only in RuleParams {sorted(wire - maths)}, only in EspoParams {sorted(maths - wire)}"
    )


def test_rollout_request_overrides_are_rule_params(fresh):
    usage = fresh["components"]["schemas"]["RolloutRequest"]["properties"]["rule_params"]
    assert "#/components/schemas/RuleParams" in json.dumps(usage)


def test_the_critic_servers_schema_has_the_upload_links_too(tmp_path):
    """`espo-server critic`'s own /openapi.json: an opened critic upload links to its routes."""
    from espo_server.critic_server import build_critic_app
    from espo_server.uploads import UploadStore
    from tests.test_admin_port import StandInCritic

    store = UploadStore(tmp_path, what="critic", reference=str(tmp_path), in_use=lambda: None)
    app = build_critic_app(StandInCritic(), upload_store=store)  # type: ignore[arg-type]
    opened = _links(app.openapi())[("POST", "/v1/critic/weights/uploads", "201")]
    assert len(opened) == 4 and all(
        link["parameters"] == {"upload_id": "$response.body#/upload_id"} for link in opened.values()
    ), opened
