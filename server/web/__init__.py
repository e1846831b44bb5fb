"""The playground: a page (index.html, playground.js, playground.css) that the HTTP API serves at /.

Shipped as package data and served as it is: plain HTML, CSS and JavaScript, no build step and
nothing fetched from elsewhere at run time. It talks to the server only through the public
HTTP/WebSocket API (docs/api.md), as any other client would; tests/test_playground.py drives it
in a real browser.
"""
