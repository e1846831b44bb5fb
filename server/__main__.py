"""``python -m nextchar.server [OPTIONS]``: the same as ``nextchar serve``, whose options it shares.

The options are defined once, on the CLI's ``serve`` command. The BLAS thread limit
is set here before NumPy is imported, which is the only moment OpenBLAS reads it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys


def main(argv: list[str] | None = None) -> None:
    from nextchar.client.cli import app

    app(["serve", *(sys.argv[1:] if argv is None else argv)], prog_name="python -m nextchar.server")


if __name__ == "__main__":
    main()
