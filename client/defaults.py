"""Where the client connects and how long it waits, unless told otherwise: plain constants.

Importing this module loads nothing (no gRPC), so the command line can show its
defaults in ``--help`` without paying for the gRPC import.
"""

DEFAULT_PORT = 50051  # where `nextchar serve` listens by default, and what an address without a port means
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_TIMEOUT = 10.0  # seconds per unary call; generous for a loaded 2-core server
