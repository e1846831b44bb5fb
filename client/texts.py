"""Training texts from files, read in bounded memory.

A corpus may be bigger than a client should hold: reading a file whole, decoding it and
encoding it again to measure it costs a few times the file's size in memory. Files are
read here in blocks and decoded incrementally instead, twice: once to check them (UTF-8, not empty, how many
characters) before anything is sent, and once more to hand the text on piece by
piece (an upload, or a local job's text). A file that fails the check names itself
and the byte that is wrong.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BLOCK_BYTES = 64 * 1024  # read at a time: decodes to at most as many characters


@dataclass(frozen=True)
class TextFiles:
    """UTF-8 files that make one text, concatenated in order."""

    paths: tuple[Path, ...]

    @classmethod
    def of(cls, files: os.PathLike[str] | Sequence[os.PathLike[str]]) -> TextFiles:
        return cls((Path(files),) if isinstance(files, os.PathLike) else tuple(Path(p) for p in files))

    def size(self) -> int:
        """Bytes on disk, all files together."""
        return sum(p.stat().st_size for p in self.paths)

    def count(self) -> int:
        """The text's characters; a ValueError names a file that is empty or not UTF-8."""
        return sum(len(piece) for piece in self.pieces())

    def read(self) -> str:
        """The whole text (for a small one: pieces() holds at most BLOCK_BYTES characters at a time)."""
        return "".join(self.pieces())

    def chunks(self, size: int) -> Iterator[str]:
        """The text in chunks of exactly ``size`` characters (the last one shorter), across files."""
        rest = ""
        for piece in self.pieces():
            piece = rest + piece  # rest is shorter than size
            end = len(piece) - len(piece) % size
            yield from (piece[i : i + size] for i in range(0, end, size))
            rest = piece[end:]
        if rest:
            yield rest

    def pieces(self) -> Iterator[str]:
        """The text in pieces of at most BLOCK_BYTES characters, files in order, checked as they are read."""
        for path in self.paths:
            yield from _decoded(path)


def _decoded(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    position = 0  # bytes of the file handed to the decoder so far
    with path.open("rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            held = decoder.getstate()[0]  # the bytes of a character the previous block cut
            try:
                piece = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                start = position - len(held) + exc.start
                raise ValueError(
                    f"{path} is not UTF-8 text (byte 0x{(held + block)[exc.start]:02x} at position "
                    f"{start}); give a text file, or convert it (iconv -t utf-8)"
                ) from None
            if not block:
                break
            position += len(block)
            if piece:
                yield piece
    if position == 0:
        raise ValueError(f"{path} is empty")
