"""What every answer carries whatever route made it: the caller's X-Request-Id echoed back (a label for the client's
logs; the engine's request ids are always the server's own), and the system_fingerprint of response bodies."""
from __future__ import annotations

import hashlib

from .._version import __version__

_HEADER = b"x-request-id"


class RequestIdMiddleware:
    """Pure ASGI (streams pass through unbuffered): a request's X-Request-Id goes back on its response, errors
    (a 401, a 404 from routing) and SSE streams included, unless the route set one itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        label = None
        if scope["type"] == "http":
            label = next((v for k, v in scope["headers"] if k == _HEADER), None)
        if not label:
            await self.app(scope, receive, send)
            return

        async def send_with_label(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == _HEADER for k, _ in headers):
                    message = {**message, "headers": headers + [(_HEADER, label)]}
            await send(message)

        await self.app(scope, receive, send_with_label)


def config_fingerprint(engine) -> str:
    """OpenAI's system_fingerprint: the package version and a digest of what decides this server's outputs (the
    engine's settings, the resolved dtype and device, the checkpoint's config), so two answers with the same
    fingerprint came from the same configuration."""
    parts = (repr(engine.engine_config), str(engine.dtype), str(engine.device), repr(engine.config))
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=5).hexdigest()
    return f"internvl-engine-{__version__}-{digest}"
