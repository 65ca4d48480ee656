"""The HTTP side of the front door (aiohttp): the OpenAI-compatible routes, the passthrough under /upstream/MODEL/,
/metrics, and the proxy to a model's server on 127.0.0.1:BackendPort, streaming the answer chunk by chunk as it comes.

aiohttp is the HTTP server and the client (issue 17 asks for a well-kept library, not a hand-rolled parser): both in
one asyncio library, with bounded request bodies (client_max_size), streamed bodies both ways, and packaged by the
distributions we target (Debian 12's python3-aiohttp 3.8 is the oldest we support)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import RouterMetrics
from .router import BackendDown, Entry, NotReady, QueueFull, Router, RouterError, Unavailable, UnknownModel
from .settings import Settings

log = logging.getLogger("gpusched-frontdoor")

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Headers that belong to one connection, not to the request or answer passed on; Host and Content-Length are set anew.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
BODY_TIMEOUT_S = 60.0  # a client that takes longer to send its body is answered 408 (slow clients hold no slot)
CONNECT_TIMEOUT_S = 10.0  # to the model's server, which runs (its port accepted) when the proxy connects

# Each router failure as OpenAI's error body says it: HTTP status, `type`, `code`.
ERRORS: dict[type[RouterError], tuple[int, str, str]] = {
    UnknownModel: (404, "invalid_request_error", "model_not_found"),
    QueueFull: (429, "rate_limit_error", "queue_full"),
    BackendDown: (502, "server_error", "backend_unavailable"),
    Unavailable: (503, "server_error", "service_unavailable"),
    NotReady: (504, "timeout_error", "model_not_ready"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, type_: str, code: str) -> web.Response:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def model_of(body: bytes) -> str:
    """The `model` of an OpenAI request body; BadRequest for a body that is not a JSON object naming one."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "the request body is not valid JSON", "invalid_json") from None
    model = request.get("model") if isinstance(request, dict) else None
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "the request body names no `model` (a string)", "missing_model")
    return model


def forwarded(headers: object, drop: frozenset[str] = HOP_BY_HOP) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in drop}  # type: ignore[attr-defined]


class FrontDoor:
    def __init__(self, router: Router, settings: Settings, metrics: RouterMetrics) -> None:
        self.router, self.settings, self.metrics = router, settings, metrics
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._answers])
        for path in OPENAI_ROUTES:
            app.router.add_post(path, self.openai)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_route("*", "/upstream/{model}/{tail:.*}", self.upstream)
        app.router.add_get("/metrics", self.metrics_page)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        # limit=0: as many connections to the models as requests in flight (the router bounds the waiting ones);
        # auto_decompress=False: the answer's bytes pass as they are, with their Content-Encoding.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self.settings.backend_timeout_sec
            ),
            auto_decompress=False,
        )

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    @web.middleware
    async def _answers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure as an OpenAI error body (aiohttp's own too: 404, 405, 413), and every answer counted."""
        try:
            response = await handler(request)
        except RouterError as e:
            status, type_, code = ERRORS[type(e)]
            response = error_response(status, str(e), type_, code)
        except BadRequest as e:
            response = error_response(e.status, e.message, "invalid_request_error", e.code)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = error_response(e.status, e.reason, "invalid_request_error", e.reason.lower().replace(" ", "_"))
        self.metrics.responses.labels(str(response.status)).inc()
        return response

    async def _body(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                return await request.read()  # at most client_max_size, else 413
        except TimeoutError:
            raise BadRequest(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", "timeout") from None

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._proxy(request, model_of(body), request.path_qs, body)

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        path = "/" + request.match_info["tail"]
        if request.query_string:
            path += "?" + request.query_string
        return await self._proxy(request, request.match_info["model"], path, body)

    async def list_models(self, _request: web.Request) -> web.Response:
        entries = await self.router.models()
        return web.json_response({"object": "list", "data": [self._model_object(e) for e in entries]})

    async def get_model(self, request: web.Request) -> web.Response:
        entry = await self.router.resolve(request.match_info["model"])
        return web.json_response(self._model_object(entry))

    @staticmethod
    def _model_object(entry: Entry) -> dict[str, object]:
        return {
            "id": entry.name,
            "object": "model",
            "created": 0,
            "owned_by": "gpusched",
            "aliases": list(entry.aliases),
        }

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _proxy(self, request: web.Request, model: str, path: str, body: bytes) -> web.StreamResponse:
        """Send the request to the model's server once the router has it ready, and pass its answer back as it
        comes. The request stays in flight (its model is not frozen) until the last byte is passed on."""
        assert self.session is not None
        async with self.router.use(model) as entry:
            url = f"http://127.0.0.1:{entry.backend_port}{path}"
            try:
                upstream = await self.session.request(
                    request.method, url, headers=forwarded(request.headers), data=body or None, allow_redirects=False
                )
            except TimeoutError:  # aiohttp's ServerTimeoutError too: the model accepted and stayed silent
                raise NotReady(
                    f"model `{entry.name}` sent nothing for {self.settings.backend_timeout_sec:g} s"
                ) from None
            except aiohttp.ClientError as e:
                raise BackendDown(f"model `{entry.name}` did not answer on port {entry.backend_port}: {e}") from None
            async with upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                response.headers.update(forwarded(upstream.headers, HOP_BY_HOP - {"content-length"}))
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                    # The status is sent already: cut the client's connection, so it sees an incomplete answer
                    # instead of a short one that looks whole.
                    log.warning("model %s broke off its answer: %s", entry.name, e)
                    if request.transport is not None:
                        request.transport.close()
                    return response
                await response.write_eof()
                return response
