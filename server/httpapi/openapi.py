"""The OpenAPI 3.1 document of the HTTP API, made from the routes and the proto's messages.

``python -m nextchar.server.httpapi.openapi > server/httpapi/openapi.json`` writes the
committed copy, which the server serves at ``/openapi.json``;
tests/test_http_api.py checks the copy is what this makes and that it names every
route the application serves. Schemas come from the message descriptors, so they
follow the proto (field names as in it, 64-bit integers as numbers).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.httpapi.errors import STATUS
from nextchar.server.httpapi.routes import EVENT_ROUTES, ROUTES, Route

SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_ENUM: {"type": "string"},
}
ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "enum": sorted({c.name for c in STATUS} | {"UNAUTHENTICATED"})},
                "message": {"type": "string"},
                "details": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    },
}
PREDICTIONS = {
    "type": "object",
    "description": "Row i is the prediction after the chunk's i-th character: top_k candidates each, row-major.",
    "properties": {
        "start_offset": {"type": "integer"},
        "count": {"type": "integer"},
        "top_k": {"type": "integer"},
        "top_index": {"type": "array", "items": {"type": "integer"}},
        "top_prob": {"type": "array", "items": {"type": "number"}},
        "top_chars": {"type": "array", "items": {"type": "string"}},
        "surprisal_bits": {"type": "array", "items": {"type": ["number", "null"]}},
        "distribution": {"type": "array", "items": {"type": "number"}},
        "unknown_positions": {"type": "array", "items": {"type": "integer"}},
        "unknown_chars": {"type": "string"},
    },
}


def schema(descriptor: Descriptor, defs: dict[str, Any]) -> dict[str, Any]:
    """A reference to the message's schema, adding it (and those it uses) to defs."""
    name = descriptor.name
    if name not in defs:
        defs[name] = {}  # placeholder: a message may refer to itself
        properties = {f.name: field_schema(f, defs) for f in descriptor.fields}
        defs[name] = {"type": "object", "properties": properties, "additionalProperties": False}
    return {"$ref": f"#/components/schemas/{name}"}


def field_schema(field: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None:
        one = schema(field.message_type, defs)
    else:
        one = dict(SCALARS.get(field.type, {"type": "integer"}))
    return {"type": "array", "items": one} if field.is_repeated else one


def operation(route: Route, defs: dict[str, Any], events: bool) -> dict[str, Any]:
    request = getattr(pb, f"{route.rpc}Request").DESCRIPTOR
    response = getattr(pb, f"{route.rpc}Response").DESCRIPTOR
    content = "text/event-stream" if events else "application/json"
    op: dict[str, Any] = {
        "operationId": route.rpc,
        "summary": f"{route.rpc} (the gRPC method's request and response, in JSON)",
        "responses": {
            "200": {"description": "OK", "content": {content: {"schema": schema(response, defs)}}},
            "default": {"description": "refused", "content": {"application/json": {"schema": ERROR}}},
        },
    }
    params = [name.strip("{}") for name in route.path.split("/") if name.startswith("{")]
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
        ]
    if route.method != "GET":
        op["requestBody"] = {"content": {"application/json": {"schema": schema(request, defs)}}}
    else:
        op["description"] = f"Query parameters are {request.name}'s fields."
    return op


def document() -> dict[str, Any]:
    defs: dict[str, Any] = {"Error": ERROR, "Predictions": PREDICTIONS}
    paths: dict[str, dict[str, Any]] = {}
    for route, events in [*((r, False) for r in ROUTES), *((r, True) for r in EVENT_ROUTES)]:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route, defs, events)
    predicted = {
        "type": "object",
        "properties": {
            "session_id": {"type": "string"},
            "model": schema(pb.ModelRef.DESCRIPTOR, defs),
            "vocab": {"type": "string"},
            "predictions": {"$ref": "#/components/schemas/Predictions"},
        },
    }
    paths["/v1/predict"] = {
        "post": {
            "operationId": "Predict",
            "requestBody": {
                "content": {"application/json": {"schema": schema(pb.PredictRequest.DESCRIPTOR, defs)}}
            },
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": predicted}}}
            },
        }
    }
    paths["/v1/stream"] = {
        "get": {
            "operationId": "PredictStream",
            "summary": "WebSocket: PredictStreamRequest JSON text frames in, one reply frame each (docs/api.md)",
            "responses": {"101": {"description": "switching to the WebSocket protocol"}},
        }
    }
    paths["/v1/health"] = {
        "get": {
            "operationId": "Health",
            "responses": {
                "200": {"description": "SERVING"},
                "503": {"description": "NOT_SERVING (draining, or the session store unreachable)"},
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nextchar",
            "version": "v1",
            "description": "The nextchar.v1 API over HTTP (docs/api.md).",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(defs.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def render() -> str:
    return json.dumps(document(), indent=1, sort_keys=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
