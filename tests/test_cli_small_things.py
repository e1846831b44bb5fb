"""The small things a new user trips over in a first hour, each through the real command line.

Addresses without a port and host names that do not resolve, a model that does not
exist, ``--json`` on ``loss``, a binary file given to ``stream``, what ``jobs show``
says, the timings an exported history carries, greedy generation and its prime, and
``make demo``. CliRunner runs the commands in-process against real servers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nextchar.cli.app import app
from nextchar.client import NextCharClient
from nextchar.client.channel import channel_target
from nextchar.core.config import ModelConfig, TrainConfig
from nextchar.core.demo import NOTEBOOK_TEXT, notebook_configs
from nextchar.core.history import loss_figure
from nextchar.core.train import train
from server_harness import ServerThread, start_server
from typer.testing import CliRunner

runner = CliRunner()
TINY = ["--hidden", "8", "--seq-len", "8", "--batch", "2", "--epochs", "2", "--log-every", "2"]


def run(*args: str, ok: bool = True) -> tuple[str, str, int]:
    result = runner.invoke(app, list(args))
    if ok:
        assert result.exit_code == 0, result.stderr or result.stdout
    return result.stdout, result.stderr, result.exit_code


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1", "127.0.0.1:50051"),
        ("localhost", "localhost:50051"),
        ("::1", "[::1]:50051"),
        ("[::1]", "[::1]:50051"),
        ("127.0.0.1:6000", "127.0.0.1:6000"),
        ("[::1]:6000", "[::1]:6000"),
        ("127.0.0.1:6000,127.0.0.2", "ipv4:127.0.0.1:6000,127.0.0.2:50051"),
    ],
)
def test_an_address_without_a_port_means_nextchars_port_not_443(given: str, target: str) -> None:
    assert channel_target(given)[0] == target
    with NextCharClient(given) as c:
        assert c.target == target


def test_a_host_name_that_does_not_resolve_says_so_in_plain_words() -> None:
    _, err, code = run("health", "--server", "no-such-host.invalid:50051", "--timeout", "5", ok=False)
    assert code == 1 and err.count("\n") == 1
    assert err == (
        "nextchar: error: cannot find the server: no address for the host name in "
        "no-such-host.invalid:50051; check the server address (HOST:PORT, e.g. 127.0.0.1:50051)\n"
    )


def test_an_unknown_model_points_to_the_list(server_address: str) -> None:
    for args in (["generate", "--model", "missing"], ["loss", "missing"], ["models", "show", "missing"]):
        _, err, code = run(*args, "--server", server_address, ok=False)
        assert code == 1 and "missing" in err
        assert err.endswith("; `nextchar models list` shows the models this server has\n"), err


def test_loss_takes_json_as_every_data_command_does(server_address: str) -> None:
    out, _, _ = run("loss", "default", "--json", "--server", server_address)
    records = json.loads(out)
    assert records == json.loads(run("loss", "default", "--format", "json", "--server", server_address)[0])
    assert records[0]["kind"] == "step"
    _, err, code = run("loss", "default", "--json", "--format", "csv", "--server", server_address, ok=False)
    assert code == 2 and "--json and --format csv disagree" in err


def test_stream_refuses_a_binary_file_as_train_does(server_address: str, tmp_path: Path) -> None:
    binary = tmp_path / "program"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    streamed = runner.invoke(app, ["stream", "-f", str(binary), "--server", server_address])
    trained = runner.invoke(app, ["train", str(binary), "--server", server_address])
    for result in (streamed, trained):
        assert result.exit_code == 1 and result.stdout == ""
        assert "program is not UTF-8 text (byte 0x80 at position 136)" in result.stderr


def test_jobs_show_says_what_the_job_trains_and_how_far_it_got(server_address: str) -> None:
    s = ("--server", server_address)
    out, _, _ = run("train", "--text", NOTEBOOK_TEXT * 8, "--name", "shown", *TINY, "--json", *s)
    job_id = json.loads(out.splitlines()[-1])["job_id"]
    out, _, _ = run("jobs", "show", job_id, *s)
    rows = dict(line.strip("│ ").split(" │ ") for line in out.splitlines() if line.count("│") == 3)
    rows = {key.strip(): value.strip() for key, value in rows.items()}
    assert rows["state"] == "succeeded" and rows["model"] == "shown"
    assert (
        rows["hidden"] == "8" and rows["cell"] == "rnn" and rows["seq-len"] == "8" and rows["epochs"] == "2"
    )
    done, total = rows["characters"].split(" (")[0].split(" of ")
    assert done == total and int(total.replace(",", "")) > 0
    shown = json.loads(run("jobs", "show", job_id, "--json", *s)[0])
    assert shown["model_config"]["hidden"] == 8 and shown["train_config"]["batch"] == 2


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server started on an empty directory: it serves the shipped model."""
    server: ServerThread = start_server(tmp_path_factory.mktemp("empty"))
    yield f"127.0.0.1:{server.port}"
    server.close()


def test_exported_rows_carry_their_timings_and_leave_out_what_was_not_recorded(
    server_address: str, shipped: str
) -> None:
    s = ("--server", server_address)
    run("train", "--text", NOTEBOOK_TEXT * 8, "--name", "timed", *TINY, "--json", *s)
    rows = list(csv.DictReader(io.StringIO(run("loss", "timed", *s)[0])))
    assert rows and all(float(r["wall_seconds"]) > 0 and float(r["lr"]) > 0 for r in rows), rows
    assert all(float(r["chars_per_sec"]) > 0 and float(r["elapsed"]) > 0 for r in rows)
    # the shipped model's file records no timings (its bytes are the same on every build): empty, not 0.0
    rows = list(csv.DictReader(io.StringIO(run("loss", "default", "--server", shipped)[0])))
    assert rows and all(float(r["lr"]) > 0 for r in rows)
    assert {(r["chars_per_sec"], r["elapsed"], r["wall_seconds"]) for r in rows} == {("", "", "")}


def test_a_greedy_generation_that_loops_says_so_and_how_to_vary_it(server_address: str) -> None:
    s = ("--server", server_address)
    greedy = runner.invoke(app, ["generate", "--prime", "hello", "-n", "60", "-t", "0", *s])
    assert greedy.exit_code == 0
    assert re.fullmatch(
        r'greedy decoding repeats "[a-z ]{12}" from character \d+ on: it always takes the likeliest next '
        r"character, and this model's likeliest path is a loop; sampling varies it \(--temperature 0.8, "
        r"or --top-k 5\)\n",
        greedy.stderr,
    ), greedy.stderr
    sampled = runner.invoke(app, ["generate", "--prime", "hello", "-n", "60", "--seed", "3", *s])
    assert sampled.exit_code == 0 and sampled.stderr == ""  # only a greedy path is a loop for sure


def test_a_generation_reads_on_from_its_prime_in_the_library_as_on_the_command_line(
    server_address: str,
) -> None:
    with NextCharClient(server_address) as c:
        made = c.generate(prime="hello", length=30, seed=7)
    assert made.prime == "hello" and not made.text.startswith("hello")
    printed = runner.invoke(
        app, ["generate", "--prime", "hello", "-n", "30", "--seed", "7", "--server", server_address]
    )
    assert printed.stdout == f"{made}\n" == f"hello{made.text}\n"


def test_make_demo_prints_what_its_plot_shows_and_the_notebooks_recipe_beside_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nextchar.core.demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    epochs = [line for line in done.stdout.splitlines() if line.startswith("Epoch")]
    assert [line.split(":")[0] for line in epochs] == [f"Epoch {e}" for e in (1, 20, 40, 60, 80, 100)]
    assert all(re.fullmatch(r"Epoch \d+: \d\.\d{3} bits/char \(training loss \d\.\d{4}\)", e) for e in epochs)
    notebook, demo = re.findall(r"(\d\.\d{3}) bits/char after 100 epochs, (\d+)/34", done.stdout)
    assert "the notebook's  sigmoid + squared error, sgd" in done.stdout
    assert float(notebook[0]) > 1 > float(demo[0]) and int(demo[1]) > int(notebook[1])
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def legend(history: list[dict[str, Any]]) -> list[str]:
    import matplotlib.pyplot as plt

    figure = loss_figure(history)
    shown = figure.axes[0].get_legend()
    assert shown is not None
    labels = [text.get_text() for text in shown.get_texts()]
    plt.close(figure)
    return labels


def test_the_plot_legend_names_only_lines_that_can_be_seen() -> None:
    one_step_an_epoch = train(NOTEBOOK_TEXT, *notebook_configs(epochs=5)).history  # the demo's
    assert legend(one_step_an_epoch) == ["train (epoch mean)"]
    config = TrainConfig(seq_len=4, batch=1, epochs=2, log_every=1, val_fraction=0.0)
    several = train(NOTEBOOK_TEXT, ModelConfig(hidden=8), config).history
    assert legend(several) == ["train (steps)", "train (epoch mean)"]


class SlowHandshake:
    """A relay in front of a server that holds the server's first bytes back for `delay` seconds:
    a loaded machine, or a far server (each round trip of a TLS handshake costs the link's RTT)."""

    def __init__(self, upstream: str, delay: float) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream, self.delay = (host, int(port)), delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, self.delay), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
        time.sleep(delay)
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_a_server_slow_to_answer_its_handshake_is_waited_for_not_called_unreachable(
    server_address: str,
) -> None:
    relay = SlowHandshake(server_address, delay=0.5)
    try:
        with NextCharClient(relay.address, timeout=10) as c:
            assert c.health() == "SERVING"  # a connection attempt is given seconds, not 100 ms
    finally:
        relay.close()
