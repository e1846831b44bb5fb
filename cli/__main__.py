"""``python -m nextchar.cli [COMMAND]``: the same as the ``nextchar`` command (``python -m nextchar.cli serve``)."""

from __future__ import annotations

from nextchar.cli.app import run

if __name__ == "__main__":
    run()
