"""The promises the package layout makes, checked where import-linter cannot: at run time.

A Python service that only calls nextchar gets the client library, without NumPy or
any server code (make lint checks the imports statically; this checks what really
loads). And the wire messages that carry the configs stay field-for-field the
configs themselves, so a new setting cannot be added to one and forgotten in the other.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from nextchar.core.config import ModelConfig, TrainConfig
from nextchar.proto import nextchar_pb2 as pb


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_the_client_library_loads_no_numpy_and_no_server() -> None:
    modules = loaded_after("import nextchar.client; nextchar.client.NextCharClient('127.0.0.1:1').close()")
    ours = {m for m in modules if m.startswith("nextchar.")}
    assert "numpy" not in modules
    assert {m.split(".")[1] for m in ours} == {"client", "core", "proto"}
    assert {m for m in ours if m.startswith("nextchar.core")} == {"nextchar.core", "nextchar.core.config"}


def test_the_wire_configs_are_the_core_configs_field_for_field() -> None:
    for spec, config in ((pb.ModelConfigSpec, ModelConfig), (pb.TrainConfigSpec, TrainConfig)):
        wire = [f.name for f in spec.DESCRIPTOR.fields]
        assert wire == [f.name for f in dataclasses.fields(config)], spec.DESCRIPTOR.name
