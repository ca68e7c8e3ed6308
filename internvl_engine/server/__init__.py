"""OpenAI-compatible HTTP server (`internvl-engine serve`): a FastAPI app over one AsyncLLM per process, run by
uvicorn. Needs the `serve` extra (fastapi, uvicorn)."""
from __future__ import annotations

import signal

from ..settings import ServerSettings
from .app import OpenAIServer, build_app


def serve(llm, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "info", access_log: bool = False, loop: str = "auto") -> int:
    """Serves `llm` (an AsyncLLM, shut down on return) until SIGTERM or SIGINT. On SIGTERM uvicorn stops accepting,
    lets requests in flight finish for `shutdown_timeout` seconds, cancels the rest (which aborts them in the engine),
    and this returns 0."""
    import uvicorn

    config = uvicorn.Config(build_app(llm, settings), host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_graceful_shutdown=shutdown_timeout, lifespan="on",
                            loop=loop)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it, under the handler it found: a no-op one makes SIGTERM a clean
    # exit (status 0) once the shutdown above is done
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        llm.shutdown()
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


__all__ = ["serve", "build_app", "ServerSettings", "OpenAIServer"]
