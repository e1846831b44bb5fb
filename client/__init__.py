"""nextchar.client: the Python client library and the Typer CLI."""
