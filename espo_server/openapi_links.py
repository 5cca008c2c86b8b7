"""OpenAPI links from the ids the API hands out to the routes that take them.

An answer whose JSON body always holds a `<thing>_id` (a required property of the documented
model, e.g. `UploadResponse.upload_id`, `RunResponse.run_id`) gets a link to every operation under
`<collection>/{<thing>_id}`, where `<collection>` is the answering operation's path up to its own
`{<thing>_id}`, or the whole path where it has none:

    POST /v1/weights/uploads                 201 -> GET, DELETE /v1/weights/uploads/{upload_id},
                                                    PUT .../{upload_id}/shards/{shard},
                                                    POST .../{upload_id}/commit
    PUT  /v1/weights/uploads/{upload_id}/shards/{shard} 200 -> the same four
    POST /v1/runs                            200 -> GET, DELETE /v1/runs/{run_id}

Each link sets the path parameter to `$response.body#/<thing>_id`, so a client (and a stateful
fuzzer such as schemathesis) can follow an opened upload through its shards to its commit. The
links are derived from the routes and the models, so a new route under an id gets its links with
no list to keep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["add_id_links", "with_id_links"]

_METHODS = ("get", "put", "post", "delete", "patch")


def add_id_links(schema: dict[str, Any]) -> dict[str, Any]:
    """Adds the links (above) to `schema` (an OpenAPI 3 document, changed in place); returns it."""
    components = schema.get("components", {}).get("schemas", {})
    operations = [
        (path, method, operation)
        for path, item in schema.get("paths", {}).items()
        for method, operation in item.items()
        if method in _METHODS
    ]
    for path, _, operation in operations:
        for status, response in operation.get("responses", {}).items():
            if not status.startswith("2"):
                continue
            for field in sorted(_required_ids(response, components)):
                own = f"/{{{field}}}"
                collection = path.split(own)[0]
                for target_path, target_method, target in operations:
                    if not target_path.startswith(collection + own) or "operationId" not in target:
                        continue
                    links = response.setdefault("links", {})
                    links[target["operationId"]] = {
                        "operationId": target["operationId"],
                        "parameters": {field: f"$response.body#/{field}"},
                        "description": f"`{field}` of this answer, for {target_method.upper()} {target_path}",
                    }
    return schema


def with_id_links(app: FastAPI) -> FastAPI:
    """`app`, whose schema (`app.openapi()`, /openapi.json) gets the links (for an app that makes
    its schema FastAPI's way; the rollout server's app adds them where it makes its own)."""
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_id_links(make())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _required_ids(response: dict[str, Any], components: dict[str, Any]) -> set[str]:
    """The `*_id` properties that the response's JSON body always has."""
    body = response.get("content", {}).get("application/json", {}).get("schema", {})
    ref = body.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        body = components.get(ref.rsplit("/", 1)[1], {})
    return {name for name in body.get("required", []) if name.endswith("_id")}
