"""The HTTP server: OpenAI-compatible routes over an `Engine`, run-time adapter management, the web page.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
server-sent-event streaming), ``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``, ``GET /health``
and the comparison page at ``/``. Every refusal is a 4xx/5xx answer in OpenAI's error shape; with
an API key, every ``/v1/`` route wants ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from ..adapter_files.fingerprints import BaseModelMismatch
from ..errors import AdapterError, AdapterFileError, LorafitError
from .adapters import AdapterExists, SlotsBusy, UnknownAdapter, check_adapter_name
from .engine import ContextError, Delta, Engine, Failed, Finished, Request
from .protocol import (
    CHAT, COMPLETION, MAX_CHOICES, AdapterBody, ApiError, ChatBody, CompletionBody, Flavor, GenerationBody, usage,
)
from .sampling import ParamError

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
BASE_ALIAS = "base"

# exception type -> (HTTP status, error type, code); the first match wins, so subclasses come first
ERROR_TABLE: list[tuple[type[Exception], int, str, str | None]] = [
    (ContextError, 400, "invalid_request_error", "context_length_exceeded"),
    (ParamError, 400, "invalid_request_error", "invalid_value"),
    (UnknownAdapter, 404, "invalid_request_error", "model_not_found"),
    (AdapterExists, 409, "invalid_request_error", "adapter_exists"),
    (SlotsBusy, 503, "server_error", "adapter_slots_busy"),
    (BaseModelMismatch, 400, "invalid_request_error", "base_model_mismatch"),
    (AdapterFileError, 400, "invalid_request_error", "adapter_load_failed"),
    (AdapterError, 400, "invalid_request_error", "invalid_adapter_name"),
]


def as_api_error(exc: Exception) -> ApiError:
    """The HTTP form of any error a request can meet; unknown ones are a 500 server error."""
    if isinstance(exc, ApiError):
        return exc
    for kind, status, type_, code in ERROR_TABLE:
        if isinstance(exc, kind):
            return ApiError(status, str(exc), type_, getattr(exc, "param", None), code)
    return ApiError(500, f"internal error: {exc}", "server_error")


def error_response(exc: Exception) -> JSONResponse:
    error = as_api_error(exc)
    return JSONResponse(error.body(), status_code=error.status)


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer needs besides the engine."""

    base_name: str  # the base model's id in /v1/models; "base" is accepted as well
    api_key: str | None = None
    default_max_tokens: int = 256  # chat answers without max_tokens (completions default to 16)
    max_request_bytes: int = 1 << 20


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The FastAPI application; it starts `engine` on startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorafit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    api = _Api(engine, settings)
    _add_error_handlers(app)
    _add_guard(app, settings)
    _add_model_routes(app, api)
    _add_generation_routes(app, api)
    _add_adapter_routes(app, api)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure answers in OpenAI's error shape (`as_api_error`); unknown ones are logged."""

    @app.exception_handler(LorafitError)
    async def on_refusal(request: HttpRequest, exc: LorafitError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(request: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                           code="invalid_json"))
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid body")
        return error_response(ApiError(400, message, param=param, code="invalid_body"))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: HttpRequest, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def on_bug(request: HttpRequest, exc: Exception):
        log.exception("unhandled error")
        return error_response(exc)


def _add_guard(app: FastAPI, settings: ServeSettings) -> None:
    """``/v1/`` requests need the API key (when one is set) and a body of at most ``max_request_bytes``."""

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        if request.url.path.startswith("/v1/"):
            if settings.api_key and not _authorized(request, settings.api_key):
                return error_response(ApiError(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "authentication_error", code="invalid_api_key"))
            size = request.headers.get("content-length", "0")
            if not size.isdigit() or int(size) > settings.max_request_bytes:
                return error_response(ApiError(
                    413, f"request body over {settings.max_request_bytes} bytes", code="request_too_large"))
        return await call_next(request)


def _add_model_routes(app: FastAPI, api: "_Api") -> None:
    """``/health`` and the model list: the base model, then one card per adapter."""
    base_name = api.settings.base_name

    @app.get("/health")
    async def health():
        if not api.engine.alive:
            raise ApiError(503, "the engine has stopped", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        cards = [api.card(base_name, None)]
        cards += [api.card(name, base_name) for name in api.adapter_names()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model}")
    async def model_card(model: str):
        adapter = api.adapter_for(model)
        return api.card(base_name, None) if adapter is None else api.card(adapter, base_name)


def _add_generation_routes(app: FastAPI, api: "_Api") -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await api.generate(body, COMPLETION, lambda: api.completion_prompts(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        return await api.generate(body, CHAT, lambda: [api.chat_prompt(body)])


def _add_adapter_routes(app: FastAPI, api: "_Api") -> None:
    """Adapters added and removed while serving; the engine thread does the work."""

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterBody):
        pool = api.pool()
        await asyncio.wrap_future(api.engine.call(lambda: pool.add(body.name, Path(body.path))))
        return api.card(body.name, api.settings.base_name)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        pool = api.pool()
        check_adapter_name(name)
        await asyncio.wrap_future(api.engine.call(lambda: pool.remove(name)))
        return {"id": name, "object": "model", "deleted": True}


def _authorized(request: HttpRequest, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class _Api:
    """Turns request bodies into engine requests and engine events into OpenAI answers."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.started = int(time.time())

    def card(self, name: str, parent: str | None) -> dict[str, Any]:
        """The /v1/models entry of the base model (`parent` None) or of an adapter."""
        return {"id": name, "object": "model", "created": self.started, "owned_by": "lorafit", "parent": parent}

    def pool(self):
        if self.engine.adapters is None:
            raise ApiError(400, "this server runs a base model without adapter support")
        return self.engine.adapters

    def adapter_names(self) -> list[str]:
        return self.engine.adapters.names() if self.engine.adapters is not None else []

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` field names; None for the base model."""
        if model in (BASE_ALIAS, self.settings.base_name):
            return None
        check_adapter_name(model)
        if model not in self.adapter_names():
            raise ApiError(404, f"the model {model!r} does not exist; see GET /v1/models",
                           param="model", code="model_not_found")
        return model

    def completion_prompts(self, body: CompletionBody) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise ParamError("prompt", "must not be an empty list")
        vocab = len(self.tokenizer)
        out = []
        for item in prompt:
            ids = self.tokenizer(item)["input_ids"] if isinstance(item, str) else list(item)
            if any(not 0 <= i < vocab for i in ids):
                raise ParamError("prompt", f"token ids must be in [0, {vocab})")
            out.append(ids)
        return out

    def chat_prompt(self, body: ChatBody) -> list[int]:
        if not body.messages:
            raise ParamError("messages", "must hold at least one message")
        if not self.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="model")
        messages = [m.as_template_input() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise ParamError("messages", f"the chat template refused them: {exc}") from exc
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def max_tokens(self, body: GenerationBody, flavor: Flavor, prompt_len: int) -> int:
        asked = body.requested_max_tokens()
        if asked is not None:
            return asked
        if flavor is COMPLETION:
            return 16  # OpenAI's default for completions
        room = (self.engine.max_model_len or prompt_len + self.settings.default_max_tokens) - prompt_len
        return max(1, min(self.settings.default_max_tokens, room))

    async def generate(self, body: GenerationBody, flavor: Flavor,
                       tokenize: Callable[[], list[list[int]]]):
        """Check the request, queue one engine request per answer, and answer whole or streamed."""
        body.check_supported()
        adapter = self.adapter_for(body.model)
        prompts = tokenize()
        if len(prompts) * body.n > MAX_CHOICES:
            raise ParamError("prompt", f"at most {MAX_CHOICES} answers (prompts x n) per request")
        # choice i answers prompt i // n
        requests = []
        run = _Run(asyncio.get_running_loop())
        for index in range(len(prompts) * body.n):
            prompt = prompts[index // body.n]
            params = body.sampling(self.max_tokens(body, flavor, len(prompt)), index % body.n)
            self.engine.check(prompt, params)
            requests.append(Request(prompt, params, run.sink(index), adapter))
        for request in requests:
            self.engine.submit(request)
        run.requests = requests
        if body.stream:
            return await run.stream(flavor, body.model, body.include_usage)
        return await run.collect(flavor, body.model)


class _Run:
    """The engine requests of one HTTP request, and their events as they come back."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.requests: list[Request] = []

    def sink(self, index: int):
        def emit(event) -> None:  # called on the engine thread
            self._loop.call_soon_threadsafe(self._events.put_nowait, (index, event))
        return emit

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def _usage(self, finished: dict[int, Finished]) -> dict[str, int]:
        # the n answers to one prompt share its token list: count each prompt once
        prompts = {id(self.requests[i].prompt_ids): f.prompt_tokens for i, f in finished.items()}
        return usage(sum(prompts.values()), sum(f.completion_tokens for f in finished.values()))

    async def collect(self, flavor: Flavor, model: str) -> dict[str, Any]:
        texts = [""] * len(self.requests)
        finished: dict[int, Finished] = {}
        try:
            while len(finished) < len(self.requests):
                index, event = await self._events.get()
                if isinstance(event, Failed):
                    raise as_api_error(event.error)
                if isinstance(event, Delta):
                    texts[index] += event.text
                else:
                    finished[index] = event
        finally:
            self.cancel()
        choices = [flavor.choice(i, texts[i], finished[i].reason) for i in range(len(texts))]
        return flavor.envelope(flavor.new_id(), model, chunk=False, choices=choices,
                               usage=self._usage(finished))

    async def stream(self, flavor: Flavor, model: str, include_usage: bool) -> StreamingResponse:
        first = await self._events.get()
        if isinstance(first[1], Failed):
            self.cancel()
            raise as_api_error(first[1].error)
        return StreamingResponse(self._chunks(first, flavor, model, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chunks(self, first, flavor: Flavor, model: str, include_usage: bool) -> AsyncIterator[str]:
        chunk_id = flavor.new_id()
        extra = {"usage": None} if include_usage else {}

        def sse(choices: list[dict[str, Any]], **fields) -> str:
            payload = flavor.envelope(chunk_id, model, chunk=True, choices=choices, **{**extra, **fields})
            return f"data: {json.dumps(payload)}\n\n"

        finished: dict[int, Finished] = {}
        try:
            for index in range(len(self.requests)):
                start = flavor.start_chunk(index)
                if start is not None:
                    yield sse([start])
            index, event = first
            while True:
                if isinstance(event, Failed):
                    yield f"data: {json.dumps(as_api_error(event.error).body())}\n\n"
                    return
                if isinstance(event, Delta):
                    yield sse([flavor.chunk_choice(index, event.text, None)])
                else:
                    finished[index] = event
                    yield sse([flavor.chunk_choice(index, "", event.reason)])
                if len(finished) == len(self.requests):
                    break
                index, event = await self._events.get()
            if include_usage:
                yield sse([], usage=self._usage(finished))
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()
