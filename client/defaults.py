"""Where the client connects and how long it waits, unless told otherwise: plain constants.

Importing this module loads nothing (no gRPC), so the command line can show its
defaults in ``--help`` without paying for the gRPC import.
"""

DEFAULT_TARGET = "127.0.0.1:50051"  # where `nextchar serve` listens by default
DEFAULT_TIMEOUT = 10.0  # seconds per unary call; generous for a loaded 2-core server
