"""Run the API under uvicorn, with a graceful drain on SIGTERM/SIGINT.

On the first signal the server stops accepting work (new requests and /ready get 503) while running requests
finish, for at most drain_timeout_s; then uvicorn closes the socket and exits. A second signal exits at once.
The port is bound before the model loads, so a busy port is one line and exit 2, not a crash at exit with the
model half loaded; a model that fails to load stops the server, which exits with that error.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import socket
import sys
import threading
import time

import uvicorn

from slimlm.errors import SlimlmError
from slimlm.serve.api import ADMIN_ROUTES, create_app
from slimlm.serve.state import ServeConfig, ServerState

log = logging.getLogger("slimlm.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, grpc_port: int = 0):
        super().__init__(config)
        self.state = state
        self.drained = False
        self.grpc_port = grpc_port  # 0 = no gRPC service

    async def serve(self, sockets=None) -> None:
        """uvicorn's serve, with the gRPC service (--grpc-port) on the same event loop: it stops after HTTP does,
        i.e. after the drain, with a second's grace for the last responses."""
        if not self.grpc_port:
            return await super().serve(sockets)
        from slimlm.serve.grpc_server import start_grpc_server

        grpc_server = await start_grpc_server(self.state, self.config.host, self.grpc_port)
        try:
            await super().serve(sockets)
        finally:
            await grpc_server.stop(grace=1.0)

    @contextlib.contextmanager
    def capture_signals(self):
        """As uvicorn's, except that after a completed drain the process exits 0 instead of re-raising SIGTERM."""
        with super().capture_signals():
            yield
            if self.drained:
                self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        state = self.state
        engines = state.engines()
        if state.draining or not engines:
            return super().handle_exit(sig, frame)
        state.draining = True  # new requests get 503
        state.pool.stop_leasing()  # and no base starts loading
        for engine in engines:
            engine.accepting = False
        log.info(
            '{"event": "draining", "running": %d, "waiting": %d}',
            sum(len(e.running) for e in engines),
            sum(len(e.waiting) for e in engines),
        )
        threading.Thread(target=self._drain_then_exit, args=(sig, frame, engines), daemon=True).start()

    def _drain_then_exit(self, sig, frame, engines: list) -> None:
        deadline = time.monotonic() + self.state.config.drain_timeout_s
        while any(e.has_work() for e in engines) and time.monotonic() < deadline:
            time.sleep(0.05)
        for engine in engines:
            for req in list(engine.running.values()) + list(engine.waiting):
                engine.cancel(req)  # past the deadline: abort what is left
        time.sleep(0.2)  # let the last chunks reach their clients
        self.drained = True
        super().handle_exit(sig, frame)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC, ms), level, logger, then the message's own fields when it is a
    JSON object (slimlm's event and request lines) or {"message": text} (uvicorn's lines, warnings)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        message = record.getMessage()
        fields = None
        if message.startswith("{"):
            with contextlib.suppress(ValueError):
                fields = json.loads(message)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# uvicorn's own loggers through the same formatter (uvicorn.Config(log_config=...)); its access log stays off.
UVICORN_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JSONFormatter}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "loggers": {
        name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
    },
}


def setup_logging() -> None:
    """Every line the server writes to stderr is one JSON object (JSONFormatter): slimlm's start-up and request
    lines, uvicorn's (UVICORN_LOG_CONFIG) and Python warnings. uvicorn's access log is off (ours replaces it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    logging.captureWarnings(True)
    for name in ("slimlm", "py.warnings"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False
    root = logging.getLogger()  # other libraries' warnings (asyncio, ...) too, instead of Python's plain last resort
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("slimlm.serve", "slimlm.serve.requests"):  # through "slimlm"'s handler
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.setLevel(logging.NOTSET)
        lg.propagate = True


class CannotListen(SlimlmError, ValueError):
    """The port cannot be bound: a runtime failure (`slimlm serve` prints it as one line, exit 1). Still a
    ValueError, as it was before SlimlmError existed, for callers that catch it so."""


def bind_socket(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A listening socket on host:port, made before anything loads; CannotListen if it cannot be had."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise CannotListen(f"cannot listen on {host!r}: {e.strerror}; pass --host an address of this machine") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind(addr)
        sock.listen(2048)  # listening now claims the port: a second server's bind fails even with SO_REUSEADDR
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CannotListen(f"port {port} on {host} is in use; pick another {flag}") from None
        raise CannotListen(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, grpc_port: int = 0) -> None:
    """Serve until SIGTERM/SIGINT; the model loads in the background while /health already answers. grpc_port > 0
    also serves KServe v2 / Triton gRPC there (slimlm.serve.grpc_server), on the same engine.

    Raises CannotListen before loading anything if the port is taken, and the load's own error if the model fails
    to load (the server stops then: an unready server that never becomes ready only hides the fault)."""
    setup_logging()
    sock = bind_socket(host, port)
    if grpc_port:  # a busy gRPC port is one line too, before the model loads (gRPC binds it again at start)
        bind_socket(host, grpc_port, "--grpc-port").close()
    state = ServerState(config)
    warn_open_admin(state, host)
    app = create_app(state)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=UVICORN_LOG_CONFIG,
            log_level="info",
            access_log=False,
            timeout_graceful_shutdown=int(config.drain_timeout_s) + 5,
        ),
        state,
        grpc_port,
    )
    failure: list[BaseException] = []
    url = serving_url(host, sock.getsockname()[1])
    grpc_url = f"{host}:{grpc_port}" if grpc_port else None
    loader = threading.Thread(
        target=_load_or_stop, args=(state, server, failure, url, grpc_url), name="slimlm-load", daemon=True
    )
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        # Torch must not be mid-load or mid-step when the interpreter exits (C++ `terminate`, exit 134): wait for
        # the load, then stop the engine thread, whichever way the server ended.
        loader.join()
        state.close()  # the lazy loads under way too, then every engine
        sock.close()
    if failure:
        raise failure[0]


def _load_or_stop(
    state: ServerState, server: uvicorn.Server, failure: list, url: str, grpc_url: str | None = None
) -> None:
    try:
        state.load()
    except Exception as e:  # noqa: BLE001 — handed to the main thread, which re-raises it after the server stops
        failure.append(e)
        server.should_exit = True
        return
    log_serving(state, url, grpc_url)


def serving_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def log_serving(state: ServerState, url: str, grpc_url: str | None = None) -> None:
    """The start-up line an operator (or a script) waits for: the server is ready, at `url`, with these models."""
    from slimlm.version import __version__

    models = [m["id"] for m in state.list_models()]
    routes = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/version",
        "/health",
        "/ready",
        "/metrics",
    ] + (list(ADMIN_ROUTES) if state.config.allow_runtime_lora else [])
    log.info(
        json.dumps(
            {
                "event": "serving",
                "url": url,
                "models": models,
                "version": __version__,
                "api_keys": len(state.api_keys),
                "admin_keys": len(state.admin_keys),
                "routes": routes,
                **({"grpc": grpc_url} if grpc_url else {}),
            }
        )
    )


def warn_open_admin(state: ServerState, host: str) -> None:
    """A loud start-up warning when anyone who reaches the port may load adapters (no admin key)."""
    c = state.config
    if c.allow_runtime_lora and not state.admin_keys:
        log.warning(
            json.dumps(
                {
                    "event": "warning",
                    "message": (
                        f"--allow-runtime-lora without --admin-key-file: ANY client that reaches {host} may load "
                        f"and unload LoRA adapters from under {', '.join(c.lora_roots)}; set --admin-key-file "
                        "(and --api-key) unless this port is reachable by trusted clients only"
                    ),
                }
            )
        )
