"""The CLI through Typer's CliRunner against a real server: output, --json, and one-line errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from nextchar.cli.app import app
from nextchar.client import NextCharClient
from nextchar.core.demo import NOTEBOOK_TEXT
from redis_harness import RedisServer
from server_harness import ServerProcess
from typer.testing import CliRunner

runner = CliRunner()
TINY = ["--hidden", "8", "--seq-len", "8", "--batch", "2", "--epochs", "2", "--log-every", "2"]


def run(*args: str, input: str | None = None, ok: bool = True) -> tuple[str, str, int]:
    result = runner.invoke(app, list(args), input=input)
    if ok:
        assert result.exit_code == 0, result.stderr or result.stdout
    return result.stdout, result.stderr, result.exit_code


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_health_and_predict(server_address: str) -> None:
    out, _, _ = run("health", "--json", "--server", server_address)
    report = json.loads(out)
    assert report["status"] == "SERVING" and report["default_model"] == "default:v1"
    out, _, _ = run("predict", "hello wor", "--json", "-k", "2", "--server", server_address)
    rows = json_lines(out)
    assert [r["char"] for r in rows] == list("hello wor")
    assert rows[-1]["top"][0]["char"] == "l" and len(rows[-1]["top"]) == 2
    out, _, _ = run("predict", "hel", "--server", server_address)
    assert "next: l" in out.splitlines()[-1]


def test_server_from_environment(server_address: str) -> None:
    result = runner.invoke(app, ["health"], env={"NEXTCHAR_SERVER": server_address})
    assert result.exit_code == 0 and "SERVING" in result.stdout


def test_stream_from_a_pipe_prints_every_character_and_a_summary(server_address: str) -> None:
    out, _, _ = run("stream", "--json", "--chunk", "7", "--server", server_address, input=NOTEBOOK_TEXT)
    rows = json_lines(out)
    chars, summary = rows[:-1], rows[-1]["summary"]
    assert "".join(r["char"] for r in chars) == NOTEBOOK_TEXT
    assert [r["offset"] for r in chars] == list(range(len(NOTEBOOK_TEXT)))
    assert summary["chars"] == len(NOTEBOOK_TEXT) and summary["accuracy"] > 0.9
    assert 0 <= summary["bits_per_char"] < 1
    out, _, _ = run("stream", "--server", server_address, input="hello")
    assert "accuracy" in out and "next:" in out


def test_stream_attaches_to_a_session_and_eval_scores_a_file(server_address: str, tmp_path: Path) -> None:
    out, _, _ = run("stream", "--json", "--keep", "--server", server_address, input="hello wo")
    session_id = json_lines(out)[-1]["summary"]["session_id"]
    out, _, _ = run("stream", "--json", "--session", session_id, "--server", server_address, input="rld")
    rows = json_lines(out)
    assert rows[0]["offset"] == 8 and rows[-1]["summary"]["accuracy"] == 1.0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(NOTEBOOK_TEXT)
    out, _, _ = run("eval", str(corpus), "--json", "--server", server_address)
    score = json.loads(out)["summary"]
    assert score["chars"] == len(NOTEBOOK_TEXT) and score["accuracy"] > 0.9


def test_stream_and_predict_adapt_to_the_writer(server_address: str) -> None:
    text = "held a word, hello world " * 3
    out, _, _ = run("stream", "--adapt", "--json", "--server", server_address, input=text)
    summary = json_lines(out)[-1]["summary"]
    assert summary["adaptive"] is True and summary["chars"] == len(text)
    out, _, _ = run("stream", "--no-adapt", "--json", "--server", server_address, input=text)
    static = json_lines(out)[-1]["summary"]
    assert static["adaptive"] is False and summary["bits_per_char"] < static["bits_per_char"]
    adapted = json_lines(run("predict", text, "--adapt", "--json", "--server", server_address)[0])
    plain = json_lines(run("predict", text, "--json", "--server", server_address)[0])
    bits = [r["surprisal_bits"] for r in adapted]
    assert bits[:21] == pytest.approx([r["surprisal_bits"] for r in plain][:21], rel=1e-5, abs=1e-6)
    assert sum(bits[21:]) < sum(r["surprisal_bits"] for r in plain[21:])


def test_generate_is_repeatable_with_a_seed(server_address: str) -> None:
    args = ("generate", "--prime", "hello", "-n", "30", "--seed", "7", "--server", server_address)
    first, _, _ = run(*args, "--json")
    again, _, _ = run(*args, "--json")
    assert json.loads(first) == json.loads(again)
    assert len(json.loads(first)["text"]) == 30
    plain, _, _ = run(*args)
    assert plain == "hello" + json.loads(first)["text"] + "\n"  # the prime, then what follows it
    greedy, _, _ = run("generate", "--prime", "hello", "-n", "30", "-t", "0", "--server", server_address)
    assert greedy == run("generate", "--prime", "hello", "-n", "30", "-t", "0", "--server", server_address)[0]
    _, err, code = run("generate", "-t", "-1", "--server", server_address, ok=False)
    assert code == 2 and "temperature" in err


def test_sessions_commands(server_address: str) -> None:
    out, _, _ = run("stream", "--json", "--keep", "--server", server_address, input="hel")
    sid = json_lines(out)[-1]["summary"]["session_id"]
    listed = json.loads(run("sessions", "list", "--json", "--server", server_address)[0])
    assert sid in [s["session_id"] for s in listed]
    shown = json.loads(run("sessions", "show", sid, "--json", "--server", server_address)[0])
    assert shown["offset"] == 3
    twin = json.loads(
        run("sessions", "fork", sid, "--id", f"{sid}-twin", "--json", "--server", server_address)[0]
    )
    assert twin["session_id"] == f"{sid}-twin" and twin["offset"] == 3
    for target in (sid, f"{sid}-twin"):
        run("sessions", "close", target, "--server", server_address)
    _, err, code = run("sessions", "show", sid, "--server", server_address, ok=False)
    assert code == 1 and err.count("\n") == 1 and "closed" in err


def test_loss_exports_csv_json_png(server_address: str, tmp_path: Path) -> None:
    out, _, _ = run("loss", "default", "--format", "csv", "--server", server_address)
    assert out.splitlines()[0].startswith("kind,epoch,step")
    run("loss", "default:1", "--output", str(tmp_path / "loss.json"), "--server", server_address)
    assert json.loads((tmp_path / "loss.json").read_text())[0]["kind"] == "step"
    run("loss", "default", "-f", "png", "-o", str(tmp_path / "loss.png"), "--server", server_address)
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    _, err, code = run("loss", "default", "-f", "png", "--server", server_address, ok=False)
    assert code == 2 and "--output" in err


def test_train_on_the_server_then_promote_and_delete(server_address: str) -> None:
    s = ("--server", server_address)
    out, _, _ = run("train", "--text", NOTEBOOK_TEXT * 8, "--name", "tiny", *TINY, "--json", *s)
    rows = json_lines(out)
    assert any(r.get("kind") == "epoch" for r in rows)
    model = rows[-1]["model"]["model"]
    ref = f"tiny:{model['version']}"
    try:
        out, _, _ = run("models", "promote", ref, *s)
        assert f"default model: tiny:v{model['version']}" in out
        listed = json.loads(run("models", "list", "--json", *s)[0])
        assert [m["model"]["name"] for m in listed if m["is_default"]] == ["tiny"]
    finally:
        run("models", "promote", "default:1", *s)
    shown = json.loads(run("models", "show", ref, "--json", *s)[0])
    assert shown["config"]["hidden"] == 8
    run("models", "delete", ref, "--yes", *s)
    _, err, code = run("models", "show", ref, *s, ok=False)
    assert code == 1 and "tiny" in err


def test_train_detach_returns_a_running_job(server_address: str) -> None:
    out, _, _ = run(
        "train",
        "--text",
        NOTEBOOK_TEXT * 8,
        "--name",
        "detached",
        *TINY,
        "--detach",
        "--json",
        "--server",
        server_address,
    )
    assert json.loads(out)["state"] == "running"


def test_train_local_writes_where_the_server_reads(tmp_path: Path) -> None:
    corpus = tmp_path / "sonnets.txt"
    corpus.write_text(NOTEBOOK_TEXT * 8)
    out, _, _ = run("train", str(corpus), "--local", "--model-dir", str(tmp_path / "models"), *TINY, "--json")
    result = json_lines(out)[-1]  # named after its file, not "default"
    assert result["model"] == {"name": "sonnets", "version": 1} and result["default"] is True
    assert (tmp_path / "models" / "sonnets" / "1.npz").is_file()


def test_train_local_beside_a_server_sharing_models_through_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A version trained with --local must reach a server whose models live in Redis, or be refused
    before training: written only into its cache directory, no replica would ever list it."""
    url = redis_server.url.removesuffix("/0") + "/4"  # a database of its own
    redis.Redis(port=redis_server.port, db=4).flushdb()
    cache = tmp_path / "cache"
    server = ServerProcess(cache, "--store", url, "--compute-in-thread")
    try:
        corpus = tmp_path / "sonnets.txt"
        corpus.write_text(NOTEBOOK_TEXT * 8)
        local = ("train", str(corpus), "--local", "--model-dir", str(cache), *TINY)
        _, err, code = run(*local, ok=False)
        assert code == 2 and f"holds the models of {url}" in err and "--store redis://" in err, err
        assert not (cache / "sonnets").exists()  # refused before training
        out, _, _ = run(*local, "--store", url)
        assert "registered sonnets:v1" in out
        with NextCharClient(server.address) as c:
            deadline = time.monotonic() + 10
            while "sonnets:v1" not in [str(m.model) for m in c.models()]:
                assert time.monotonic() < deadline, "the server never saw the version"
                time.sleep(0.2)
            assert c.predict("hello wor", "sonnets:1").next_chars[-1] == "l"
    finally:
        server.close()


def test_a_model_is_named_by_name_or_by_its_file_never_by_default(tmp_path: Path) -> None:
    shouting, other = tmp_path / "Shakespeare.txt", tmp_path / "more.txt"
    for path in (shouting, other):
        path.write_text(NOTEBOOK_TEXT * 8)
    models = ("--local", "--model-dir", str(tmp_path / "models"), *TINY)
    for args, words in (
        ([str(shouting)], "'Shakespeare' is not a model name"),
        ([str(shouting), str(other)], "no one file to name it after"),
        (["--text", NOTEBOOK_TEXT * 8], "no one file to name it after"),
    ):
        _, err, code = run("train", *args, *models, ok=False)
        assert code == 2 and "--name NAME" in err and words in err, err
    assert not (tmp_path / "models" / "default").exists()
    out, err, _ = run("train", str(shouting), "--name", "bard", *models)
    assert "registered bard:v1" in out and "model bard:" in err


def test_unreadable_training_files_are_named(tmp_path: Path) -> None:
    empty, binary = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_bytes(b"")
    binary.write_bytes("héllo wörld, ça va".encode("latin-1"))
    for path, words in ((empty, "empty.txt is empty"), (binary, "latin1.txt is not UTF-8 text (byte 0xe9")):
        _, err, code = run("train", str(path), "--local", "--model-dir", str(tmp_path / "m"), ok=False)
        assert code == 1 and words in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["predict", "hello", "--model", "nope"], 1, "nope"),
        (["predict", "hello", "--top-k", "0"], 2, "--top-k"),
        (["predict", "hello", "--server", "127.0.0.1:1", "--timeout", "1"], 1, "cannot reach the server"),
        (
            ["predict", "hello", "--server", "127.0.0.1:1", "--timeout", "1"],
            1,
            "start one with `nextchar serve`",
        ),
        (["eval", "/no/such/file"], 2, "does not exist"),
        (["train", "--text", "hi", "--hidden", "0"], 1, "hidden"),
        (["train", "--text", "hi", "--name", "hi"], 1, "cannot fill one step"),
        (["train"], 2, "give training FILES"),
        (["train", "--text", ""], 2, "the text is empty"),
        (["train", "--text", "hi", "/etc/hostname"], 2, "not both"),
        (["generate", "--temperature", "-1"], 2, "temperature"),
        (["generate", "--top-p", "1.5"], 2, "top-p"),
        (["loss", "default", "-o", "x.txt"], 2, "cannot tell the format"),
        (["sessions", "fork", "nope"], 1, "no such session"),
        (["models", "delete", "default"], 2, "version"),
    ],
)
def test_errors_are_one_line_with_a_non_zero_exit(
    server_address: str, args: list[str], code: int, words: str
) -> None:
    result = runner.invoke(app, args, env={"NEXTCHAR_SERVER": server_address})
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("nextchar: error: ") and result.stderr.count("\n") == 1
    assert words in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_complete_and_rewind_from_the_command_line(server_address: str) -> None:
    out, _, _ = run("complete", "--prime", "hello wo", "--server", server_address)
    first = out.splitlines()[0].split()
    assert first[1:] == ["hello", "world"] and 0.5 < float(first[0]) <= 1
    made, _, _ = run("stream", "--keep", "--json", "--server", server_address, input="hello wor")
    session_id = json.loads(made.splitlines()[-1])["summary"]["session_id"]
    out, _, _ = run("sessions", "rewind", session_id, "2", "--json", "--server", server_address)
    rewound = json.loads(out)
    assert rewound["session"]["offset"] == 7 and rewound["next"][0]["char"] == "o"
    out, _, _ = run("complete", "--session", session_id, "-n", "1", "--json", "--server", server_address)
    assert json.loads(out)["completions"][0]["text"] == "orld"
    _, err, code = run("sessions", "rewind", session_id, "99", "--server", server_address, ok=False)
    assert code == 1 and "at most 7" in err


def test_the_small_things_people_notice(server_address: str) -> None:
    out, _, _ = run("--version")
    assert out.startswith("nextchar ") and out.strip().split()[1][0].isdigit()
    short, _, _ = run("stream", "-h")
    assert short == run("stream", "--help")[0] and "--keep / --no-keep" in short
    assert "<bool>" not in short and "<bool>" not in run("serve", "--help")[0]
    bare = runner.invoke(app, [])
    assert bare.exit_code == 0 and "Usage: " in bare.stdout and not bare.stderr  # help, no empty error
    _, err, code = run("models", "delete", "default:1", "--server", server_address, input="n\n", ok=False)
    assert code == 0 and "kept default:v1" in err  # answering no is a decision, not an error
    _, err, code = run("serve", "--port", "99999", ok=False)
    assert code == 1 and err == "nextchar: error: port: out of range (99999)\n"


def test_a_second_serve_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "nextchar.cli",
            "serve",
            "--port",
            str(port),
            "--model-dir",
            str(tmp_path),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.endswith(
        f"nextchar: error: 127.0.0.1:{port} is in use: is another nextchar serve (or "
        "make run) running? stop it, or choose another port with --port\n"
    ), done.stderr
    assert "Traceback" not in done.stderr and "Failed to bind" not in done.stderr


def test_jobs_from_the_command_line(server_address: str) -> None:
    s = ("--server", server_address)
    out, _, _ = run(
        "train", "--text", NOTEBOOK_TEXT * 8, "--name", "watched", *TINY, "--detach", "--json", *s
    )
    job_id = json.loads(out)["job_id"]
    out, _, _ = run("jobs", "watch", job_id, *s)  # re-attached: to the end, then what was kept
    assert "registered watched:v" in out and "best validation" in out
    listed = {j["job_id"]: j for j in json.loads(run("jobs", "list", "--json", *s)[0])}
    assert listed[job_id]["state"] == "succeeded" and listed[job_id]["attempts"] == 1
    out, _, _ = run("jobs", "show", job_id, *s)
    assert job_id in out and "succeeded" in out
    out, _, _ = run("jobs", "cancel", job_id, *s)
    assert "already succeeded" in out
    _, err, code = run("jobs", "resume", job_id, *s, ok=False)
    assert code == 1 and "only a failed job" in err
    _, err, code = run("jobs", "show", "job-nope", *s, ok=False)
    assert code == 1 and "no such job" in err
