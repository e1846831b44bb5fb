"""docs/client.md, the client library's reference, is complete and its examples run as written.

Every name in ``nextchar.client.__all__`` has its entry, and so does every public method of
the client, a session and a training run; the page's examples run in order against a
real server on the shipped default model (what `make run` serves on a fresh clone), each
printing what the page says it prints (tests/doc_blocks.py).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator

import nextchar.client
import pytest
from doc_blocks import ROOT, blocks, run_python
from nextchar.client import NextCharClient, NextCharError, Session, TrainingRun
from server_harness import ServerProcess

PAGE = ROOT / "docs" / "client.md"
ADDRESS = "127.0.0.1:50051"  # the page's server, as `make run` starts it


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A first start on an empty registry: the shipped model as default:v1, nothing else."""
    server = ServerProcess(tmp_path_factory.mktemp("models"))
    yield server
    server.close()


def headings(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def public(cls: type) -> list[str]:
    return [name for name, _ in inspect.getmembers(cls) if not name.startswith("_")]


@pytest.mark.parametrize("name", nextchar.client.__all__)
def test_every_public_name_has_an_entry(name: str) -> None:
    text = PAGE.read_text(encoding="utf-8")
    value = getattr(nextchar.client, name)
    if isinstance(value, type) and issubclass(value, NextCharError):
        tree, *examples = blocks(text.split("## Errors", 1)[1])  # the hierarchy as the page draws it
        assert re.search(rf"\b{name}\b", tree.code), f"{name} is missing from the errors' tree"
        used = "".join(b.code for b in examples if b.language == "python")
        assert re.search(rf"\b{name}\b", used), f"no example of the errors uses {name}"
    else:
        assert f"`{name}`" in headings(text), f"{name} has no heading of its own"


@pytest.mark.parametrize(
    ("cls", "spelled"), [(NextCharClient, "client.{}"), (Session, "`{}"), (TrainingRun, "`{}")]
)
def test_every_method_is_described(cls: type, spelled: str) -> None:
    text = PAGE.read_text(encoding="utf-8")
    missing = [name for name in public(cls) if spelled.format(name) not in text]
    assert not missing, f"{cls.__name__}: {missing} are not in docs/client.md"


def test_the_examples_run_and_print_what_the_page_says(make_run: ServerProcess) -> None:
    ran = run_python(blocks(PAGE.read_text(encoding="utf-8")), "docs/client.md", {ADDRESS: make_run.address})
    assert ran >= 20
