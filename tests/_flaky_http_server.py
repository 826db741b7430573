"""A real HTTP server for the remote-shard tests that fails on purpose, run as
``python -m tests._flaky_http_server DIRECTORY``: it prints ``port N`` once listening.

Per path: the first GET answers 503 (a transient server error); the second GET of a ``.tar``
sends its full Content-Length header but only half the body, then closes the connection (a
transfer broken mid-shard); later GETs serve the file. Every request is appended to
``DIRECTORY/requests.log`` so the test can see the retries happen.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_lock = threading.Lock()
_seen: Counter = Counter()


class FlakyHandler(SimpleHTTPRequestHandler):
    def do_GET(self):
        with _lock:
            _seen[self.path] += 1
            attempt = _seen[self.path]
            with open(Path(self.directory) / "requests.log", "a") as log:
                log.write(f"{self.path} {attempt}\n")
        if attempt == 1:
            self.send_error(503, "try again")
            return
        if attempt == 2 and self.path.endswith(".tar"):
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


def main() -> None:
    directory = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FlakyHandler, directory=directory))
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
