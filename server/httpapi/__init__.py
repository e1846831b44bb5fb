"""The HTTP/JSON and WebSocket API: the nextchar.v1 service in JSON, beside gRPC, in the same process.

Requests and responses are the nextchar.v1 messages in protobuf's JSON form (field
names as in the proto), so one schema documents both protocols; docs/api.md and
the OpenAPI document (``openapi.json``, served at ``/openapi.json``) describe the
routes. Every route calls the same protocol-neutral service (nextchar.server.service)
and session core (nextchar.server.sessions) the gRPC servicer calls: the same
validation, limits, reply budget, open-call cap and token.
"""
