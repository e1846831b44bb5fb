"""A running server finds model versions another process wrote (``nextchar train --local``)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from nextchar.core.demo import NOTEBOOK_TEXT, notebook_configs
from nextchar.core.train import train
from nextchar.proto import nextchar_pb2 as pb
from nextchar.server.registry import Registry
from server_harness import make_registry, start_server


def test_versions_written_by_another_process_are_found(tmp_path: Path) -> None:
    make_registry(tmp_path, versions=1)
    server = start_server(tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as missing:
            server.stub.DescribeModel(pb.DescribeModelRequest(model=pb.ModelRef(name="other")), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        model_config, config = notebook_configs(epochs=5)
        result = train(NOTEBOOK_TEXT, model_config, config)
        Registry(tmp_path).register("other", result.model, history=result.history, summary=result.summary)

        listed = server.stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert ("other", 1) in {(m.model.name, m.model.version) for m in listed.models}
        created = server.stub.CreateSession(
            pb.CreateSessionRequest(model=pb.ModelRef(name="other")), timeout=5
        )
        assert created.session.model.name == "other"
    finally:
        server.close()
