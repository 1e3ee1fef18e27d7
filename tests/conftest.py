"""Shared fixtures: where the shared data lives, a throwaway HTTP server for download tests, a run killed midway."""
import contextlib
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules are plain files at the top of the repo


@pytest.fixture(scope="session")
def shared():
    """The read-only shared/ folder (BLOCKPRUNE_SHARED, else ../shared beside the repo)."""
    path = Path(os.environ.get("BLOCKPRUNE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set BLOCKPRUNE_SHARED; README.md lists the files)")
    return path


@pytest.fixture
def http_server(monkeypatch):
    """start(files) serves files on 127.0.0.1 (a free port) from a thread and returns its base URL.
    files maps a URL path ("/dev-v1.1.json") to the bytes to send, or to a function given the
    BaseHTTPRequestHandler to answer by hand (bad lengths, cut-off transfers). Paths not in files get
    404. start.requests lists the paths asked for, in order. The servers stop after the test."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must never go through a proxy
    servers = []

    def start(files):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                start.requests.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                elif callable(body):
                    body(self)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):  # keep the test output quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    start.requests = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def ctrl_c_in_call(n):
    """A Ctrl-C in the n-th call of the regulariser, in the middle of a training step: the run inside must stop
    with KeyboardInterrupt."""
    import blockprune as bp
    regularization, calls = bp.regularization, []

    def crash(masked):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return regularization(masked)
    bp.regularization = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        bp.regularization = regularization
