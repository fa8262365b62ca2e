"""The OpenRPC document of rpc.discover, derived from the dispatcher's own msgspec types."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from omkd.rpc.methods import Access, Method
from omkd_client.codes import ErrorCode

__all__ = ["openrpc_document"]

OPENRPC_VERSION = "1.3.2"
_REF = "#/components/schemas/{name}"
# A record as sent in a result has every field, while as params most may be left out: a
# result type that is a params type too has a schema of its own (``GoalRecordResult``).
_RESULT_SUFFIX = "Result"
_RESULT_REF = "#/results/{name}"  # placeholder, rewritten once the names are known
# Fields that are optional in the params or the Python record but that the daemon always
# fills in a result: the ids it assigns.
_ASSIGNED = {
    "BudgetCheckpoint": "checkpoint_id",
    "ArtifactRecord": "artifact_id",
    "Subscribed": "after_event_id",
}


def openrpc_document(methods: Iterable[Method], version: str) -> dict[str, Any]:
    """Return an OpenRPC 1.x document naming every method, its params and its result."""
    methods = list(methods)
    param_schemas, components = msgspec.json.schema_components(
        [m.params for m in methods], ref_template=_REF
    )
    placeheld, result_components = msgspec.json.schema_components(
        [m.result for m in methods], ref_template=_RESULT_REF
    )
    names = {n: n + _RESULT_SUFFIX if n in components else n for n in result_components}
    result_schemas = [_with_refs(schema, names) for schema in placeheld]
    for name, schema in result_components.items():
        components[names[name]] = _as_sent(_with_refs(schema, names), _ASSIGNED.get(name))
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "omkd",
            "version": version,
            "description": "omkd's JSON-RPC 2.0 methods over its Unix socket",
        },
        "methods": [
            _method(m, p, r, components)
            for m, p, r in zip(methods, param_schemas, result_schemas, strict=True)
        ],
        "components": {"schemas": components},
    }


def _with_refs(schema: Any, names: dict[str, str]) -> Any:
    """``schema`` with its placeholder references to result components made real."""
    if isinstance(schema, list):
        return [_with_refs(item, names) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith(_RESULT_REF.format(name="")):
        name = ref.rsplit("/", 1)[1]
        return {**schema, "$ref": _REF.format(name=names[name])}
    return {key: _with_refs(value, names) for key, value in schema.items()}


def _as_sent(schema: dict[str, Any], assigned: str | None) -> dict[str, Any]:
    """The schema of a result object: every field present, an assigned id never null."""
    properties = schema.get("properties")
    if properties is None:
        return schema
    schema = {**schema, "required": list(properties)}
    if assigned is not None:
        (never_null,) = [s for s in properties[assigned]["anyOf"] if s != {"type": "null"}]
        schema["properties"] = {**properties, assigned: never_null}
    return schema


def _method(
    method: Method, params_ref: dict[str, Any], result: dict[str, Any], components: dict[str, Any]
) -> dict[str, Any]:
    params_schema = components[params_ref["$ref"].rsplit("/", 1)[1]]
    required = set(params_schema.get("required", ()))
    return {
        "name": method.name,
        "summary": method.summary,
        "paramStructure": "by-name",
        "params": [
            {"name": name, "required": name in required, "schema": schema}
            for name, schema in params_schema.get("properties", {}).items()
        ],
        "result": {"name": "result", "schema": result},
        "errors": [
            {"code": int(code), "message": ErrorCode(code).name.lower()} for code in _errors(method)
        ],
    }


def _errors(method: Method) -> list[ErrorCode]:
    """The errors a call of ``method`` may answer: its own, and those of its kind. (Errors
    of the message itself, -32700 and -32600, are any method's.)"""
    codes = {ErrorCode.INVALID_PARAMS, *method.errors}  # unknown params: every method
    if method.access is not Access.SESSION:
        codes.add(ErrorCode.STORAGE_FAILURE)  # the disk
    if method.access is Access.WRITE:
        codes.add(ErrorCode.BUSY)  # the write lock, past the lock timeout
    if not method.when_aborted:
        codes.add(ErrorCode.TRANSACTION_ABORTED)  # until tx.rollback
    return sorted(codes, reverse=True)
