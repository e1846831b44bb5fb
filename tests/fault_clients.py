"""Programs the fault tests run as separate processes, so that they can be killed with SIGKILL.

    python tests/fault_clients.py stream ADDRESS TEXT   stream TEXT one character at a time, print
                                                        "<session id> <offset>", then hang mid-stream
    python tests/fault_clients.py save PATH HIDDEN      save a model of HIDDEN units to PATH over and
                                                        over, printing "saving <i>" before each save
    python tests/fault_clients.py uploads ADDRESS N SIZE
                                                        start N UploadText streams, send each one piece
                                                        of SIZE bytes (none when 0), print "sent",
                                                        then hang without finishing them

A test kills them at the worst moment (a stream left open, a save half written) and
checks what the server or the file system kept.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import grpc
from nextchar.core.config import ModelConfig
from nextchar.core.model import CharRNN
from nextchar.core.modelfile import save_model
from nextchar.core.vocab import Vocab
from nextchar.proto import nextchar_pb2 as pb
from nextchar.proto import nextchar_pb2_grpc as pb_grpc


def stream_then_hang(address: str, text: str) -> None:
    """Send text one character per message, report the session and offset, then never finish."""
    hang = threading.Event()

    def requests() -> Iterator[pb.PredictStreamRequest]:
        for ch in text:
            yield pb.PredictStreamRequest(text=ch)
        hang.wait()  # the stream stays open until the process is killed

    with grpc.insecure_channel(address) as channel:
        replies = pb_grpc.NextCharServiceStub(channel).PredictStream(requests())
        for i, reply in enumerate(replies):
            if i == len(text) - 1:
                p = reply.predictions
                print(reply.session_id, p.start_offset + p.count, flush=True)


def save_forever(path: str, hidden: int) -> None:
    """Overwrite path with a big model; each version carries its number in the summary."""
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyz .,")
    model = CharRNN.create(ModelConfig(hidden=hidden), vocab, seed=0)
    i = 0
    while True:
        i += 1
        print(f"saving {i}", flush=True)
        save_model(path, model, summary={"iteration": i})


def uploads_then_hang(address: str, n: int, size: int) -> None:
    """Open n uploads on one connection, each one piece (or none) in, and never finish them."""
    hang = threading.Event()
    sent = threading.Semaphore(0)

    def requests() -> Iterator[pb.UploadTextRequest]:
        if size:
            yield pb.UploadTextRequest(piece="x" * size)
        sent.release()
        hang.wait()  # the upload stays open until the process is killed

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.NextCharServiceStub(channel)
    calls = [stub.UploadText.future(requests()) for _ in range(n)]
    for _ in calls:
        sent.acquire()
    print("sent", flush=True)
    hang.wait()


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "stream":
        stream_then_hang(args[0], args[1])
    elif mode == "save":
        save_forever(args[0], int(args[1]))
    elif mode == "uploads":
        uploads_then_hang(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
