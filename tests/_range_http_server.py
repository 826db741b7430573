"""A real HTTP server that answers ``Range: bytes=N-`` requests with 206 Partial Content (as
nginx, S3's HTTP endpoint or a CDN do; Python 3.11's ``http.server`` ignores Range), run as
``python -m tests._range_http_server DIRECTORY``: it prints ``port N`` once listening and appends
``<path> <range or ->`` per GET to ``DIRECTORY/requests.log``."""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_lock = threading.Lock()


class RangeHandler(SimpleHTTPRequestHandler):
    def do_GET(self):
        requested = self.headers.get("Range")
        with _lock, open(Path(self.directory) / "requests.log", "a") as log:
            log.write(f"{self.path} {requested or '-'}\n")
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            super().do_GET()
            return
        size = path.stat().st_size
        start = int(match.group(1))
        if start >= size:
            self.send_error(416, "Range Not Satisfiable")
            return
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        with open(path, "rb") as file:
            file.seek(start)
            try:
                while chunk := file.read(1 << 16):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a reader that owns only part of the shard hangs up at its end

    def log_message(self, *args):
        pass


def main() -> None:
    directory = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=os.path.abspath(directory)))
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
