"""A real local HTTP file server for download tests: Range requests, redirects and scripted faults."""

from __future__ import annotations

import http.server
import threading


class FileServer:
    """Serves ``files`` (name → bytes) at ``url + "/" + name``, honouring ``Range: bytes=N-``.

    Scripted per name: ``fail_first`` (that many 503 answers first), ``cut_first`` (that many
    responses cut after half the body, connection dropped), ``redirects`` (name → name, a 302);
    ``honour_range = False`` answers every Range request with the whole file (200). ``log`` holds
    ``(name, Range header or None, status)`` of every request.
    """

    def __init__(self, files: dict[str, bytes], redirects: dict[str, str] | None = None, prefix: str = ""):
        self.files, self.redirects = files, dict(redirects or {})
        self.reset()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                if name in server.redirects:
                    server.log.append((name, rng, 302))
                    self.send_response(302)
                    self.send_header("Location", self.path[: -len(name)] + server.redirects[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name not in server.files:
                    server.log.append((name, rng, 404))
                    self.send_error(404)
                    return
                if server.fail_first.get(name, 0) > 0:
                    server.fail_first[name] -= 1
                    server.log.append((name, rng, 503))
                    self.send_error(503)
                    return
                data, status, start = server.files[name], 200, 0
                if rng and server.honour_range:
                    start, status = int(rng.split("=")[1].split("-")[0]), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                server.log.append((name, rng, status))
                if server.cut_first.get(name, 0) > 0:  # send half the body, then drop the connection
                    server.cut_first[name] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{prefix}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reset(self) -> None:
        """No faults, Range honoured, an empty log."""
        self.fail_first: dict[str, int] = {}
        self.cut_first: dict[str, int] = {}
        self.honour_range = True
        self.log: list[tuple[str, str | None, int]] = []

    def requests_for(self, name: str) -> list[tuple[str, str | None, int]]:
        return [entry for entry in self.log if entry[0] == name]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
