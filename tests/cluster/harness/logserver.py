"""The part of a kubelet's HTTPS API that ``kubectl logs`` needs: /containerLogs/{ns}/{pod}/{container}.

The API server proxies log requests to the address and port a Node reports, so the node agent serves
its pods' log files here (``follow``, ``previous`` and ``tailLines`` included), over TLS with a
certificate from the cluster's CA.
"""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

if TYPE_CHECKING:
    from .agent import Agent


def serve_logs(agent: Agent, cfg: dict[str, Any]) -> ThreadingHTTPServer:
    """Serve /containerLogs/{ns}/{pod}/{container} over TLS, as the API server expects of a kubelet."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            if url.path == "/healthz":
                self._send(200, b"ok")
                return
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._send(404, b"not found")
                return
            _, ns, name, container = parts
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            runner = next((r for r in list(agent.runners.values()) if r.namespace == ns and r.name == name), None)
            if runner is None or runner.find(container) is None:
                self._send(404, f"container {container} of pod {ns}/{name} is not on this node".encode())
                return
            path = runner.log_path(container, previous=query.get("previous") == "true")
            data = path.read_bytes() if path.exists() else b""
            if "tailLines" in query:
                lines = data.splitlines(keepends=True)
                data = b"".join(lines[-int(query["tailLines"]) :]) if int(query["tailLines"]) > 0 else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(data)
            if query.get("follow") != "true":
                return
            offset = path.stat().st_size if path.exists() else 0
            c = runner.find(container)
            while not agent.stopping.is_set():
                size = path.stat().st_size if path.exists() else 0
                if size > offset:
                    with path.open("rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read(size - offset)
                    offset = size
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif c is None or not c.running:
                    return
                time.sleep(0.2)

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", agent.kubelet_port), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cfg["serving_cert"], cfg["serving_key"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
