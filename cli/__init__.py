"""nextchar.cli: the ``nextchar`` command line, the one package that knows both the client library and the server."""
