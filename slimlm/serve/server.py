"""Run the API under uvicorn, with a graceful drain on SIGTERM/SIGINT.

On the first signal the server stops accepting work (new requests and /ready get 503) while running requests
finish, for at most drain_timeout_s; then uvicorn closes the socket and exits. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

import uvicorn

from slimlm.serve.api import create_app
from slimlm.serve.state import ServeConfig, ServerState

log = logging.getLogger("slimlm.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.drained = False

    @contextlib.contextmanager
    def capture_signals(self):
        """As uvicorn's, except that after a completed drain the process exits 0 instead of re-raising SIGTERM."""
        with super().capture_signals():
            yield
            if self.drained:
                self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        state = self.state
        if state.draining or state.engine is None:
            return super().handle_exit(sig, frame)
        state.draining = True
        state.engine.accepting = False
        log.info('{"event": "draining", "running": %d, "waiting": %d}', len(state.engine.running),
                 len(state.engine.waiting))
        threading.Thread(target=self._drain_then_exit, args=(sig, frame), daemon=True).start()

    def _drain_then_exit(self, sig, frame) -> None:
        deadline = time.monotonic() + self.state.config.drain_timeout_s
        while self.state.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.05)
        for req in list(self.state.engine.running.values()) + list(self.state.engine.waiting):
            self.state.engine.cancel(req)  # past the deadline: abort what is left
        time.sleep(0.2)  # let the last chunks reach their clients
        self.drained = True
        super().handle_exit(sig, frame)


def setup_logging() -> None:
    """Request log lines are JSON, one per line, on stderr; uvicorn's access log is off (ours replaces it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("slimlm.serve", "slimlm.serve.requests"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGTERM/SIGINT; the model loads in the background while /health already answers."""
    setup_logging()
    state = ServerState(config)
    app = create_app(state)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=int(config.drain_timeout_s) + 5), state)
    state.load_in_background()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.stop()
