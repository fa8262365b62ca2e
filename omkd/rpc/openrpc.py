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


def openrpc_document(methods: Iterable[Method], version: str) -> dict[str, Any]:
    """Return an OpenRPC 1.x document naming every method, its params and its result."""
    methods = list(methods)
    types = [m.params for m in methods] + [m.result for m in methods]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    n = len(methods)
    param_schemas, result_schemas = schemas[:n], schemas[n:]
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
