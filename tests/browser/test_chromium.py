"""The browser harness itself: the system Chromium renders a page served on loopback."""

from __future__ import annotations

import http.server
import threading
from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_system_chromium_renders_a_loopback_page(page: Any) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (b"<html><body><h1 id='t'>xrayops browser check</h1>"
                    b"<button onclick=\"this.textContent='ok'\">go</button></body></html>")
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        assert page.locator("#t").inner_text() == "xrayops browser check"
        page.get_by_role("button", name="go").click()
        assert page.get_by_role("button").inner_text() == "ok"  # JavaScript ran in the real browser
    finally:
        server.shutdown()
