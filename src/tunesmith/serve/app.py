"""The OpenAI-compatible API and web chat page that `tunesmith deploy` serves (a FastAPI app; uvicorn runs it).

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET / (the chat page).
The request's `model` picks what answers: the base model or one of its adapters, all on one copy of the base
weights (engine.py runs them on one worker thread). Adapters get the system prompt they were trained with when a
conversation carries none; the base model gets its template's default (or --system when given).

The model loads in a background thread after the port opens: /health answers 503 until it is ready, then 200.
Every error is OpenAI's envelope {"error": {"message", "type", "param", "code"}} with the matching status; user
input never causes a 500. Where we differ from OpenAI:
  * a request that runs past --request_timeout ends with 408 (mid-stream: an error event before [DONE]);
  * vLLM's extension fields `top_k` and `repetition_penalty` are accepted; logprobs and echo are refused (400).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.args import DeployArgs
from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig, with_defaults
from tunesmith.runs import read_checkpoint_args
from tunesmith.serve.engine import Engine, EngineBusy, Job, log
from tunesmith.session import Session, sampling_from

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # 1 MiB of JSON is ~250k tokens of text, far past any context we serve
DRAIN_LIMIT = 16 << 20  # an oversized body is read (and dropped) up to here so the client sees the 413
PAGE_HEADERS = {  # the page needs nothing from elsewhere; no inline script can run even if text slipped into HTML
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- request bodies ----------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields chat and text completions share. Unknown fields are ignored, as OpenAI's SDKs send many."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # None: the first adapter, else the base model
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # vLLM's extension: no end-of-turn before this many tokens (benchmarks)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


def parse_body(cls: type[BaseModel], body) -> BaseModel:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors())


def validation_error(errors) -> ApiError:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # pydantic names the union member that failed ("messages.0.content.str"); the field path is what users know
    loc = [p for p in loc if not (p in ("str", "int", "list[str]", "list[int]", "list[dict]", "list[list[int]]")
                                  or p.startswith(("list[", "function-")))]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    return ApiError(400, f"Invalid value for '{param}': {first.get('msg')}.", param=param)


async def read_json(request: Request):
    """The JSON body, at most MAX_BODY bytes (413 beyond; 400 when it is not JSON)."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > MAX_BODY
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            break
        if not too_big and size <= MAX_BODY:
            chunks.append(chunk)
    if too_big or size > MAX_BODY:
        raise ApiError(413, f"The request body is larger than {MAX_BODY >> 20} MiB.", code="request_too_large")
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request ({e}).", code="invalid_json")


# ---- what is served ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServedModel:
    id: str
    adapter: str | None  # None: the base model
    system: str | None  # used when a conversation has no system message (None: the template's default)
    parent: str | None
    root: str


def served_models(args: DeployArgs, session: Session) -> dict[str, ServedModel]:
    base_src = args.model or str(session.lm.path)
    base_id = args.served_model_name or Path(base_src).name.removesuffix(".gguf")
    merged = args.merge_lora and session.adapters  # the adapter is folded into the weights: no plain base left
    out = {} if merged else {base_id: ServedModel(base_id, None, args.system, None, str(session.lm.path))}
    for name, path in session.adapters.items():
        if name == base_id:
            raise UserError(f"--adapters {name}={path}: the adapter's name equals the base model's; pick another NAME.")
        system = args.system if args.system is not None else read_checkpoint_args(path).get("system")
        out[name] = ServedModel(name, None if merged else name, system, None if merged else base_id, str(path))
    return out


class Backend:
    """The loaded session, its engine and what it serves; `ready` once the background load has finished."""

    def __init__(self, load_session: Callable[[], Session], args: DeployArgs):
        self.args = args
        self._load_session = load_session
        self.ready = threading.Event()
        self.error: str | None = None
        self.on_failure: Callable[[], None] = lambda: None
        self.session: Session | None = None
        self.generator: Generator | None = None
        self.engine: Engine | None = None
        self.models: dict[str, ServedModel] = {}
        self.defaults: SamplingConfig | None = None

    def load(self) -> None:
        try:
            session = self._load_session()
            self.models = served_models(self.args, session)
            self.defaults = sampling_from(self.args, session.lm)
            self.session, self.generator = session, Generator(session.lm, compiled=self.args.torch_compile)
            on_gpu = self.generator.model.lm_head_weight.device.type == "cuda"
            rows = self.args.max_num_seqs or (16 if on_gpu else 4)
            max_len = min(self.args.max_model_len or (8192 if on_gpu else 4096), self.generator.context_length)
            default = next((m.adapter for m in self.models.values() if m.parent), None)  # resolve(None)'s
            if self.generator.compiled and on_gpu:
                print("tunesmith deploy: compiling the decode step for this GPU (once per start)...", flush=True)
            mix = len({m.adapter for m in self.models.values()}) > 1  # adapters (or one and the base) side by side
            self.engine = Engine(self.generator, self.args.max_concurrency, rows, max_len, warm_adapter=default,
                                 mix_adapters=mix)
            self.engine.warm.wait()
            if self.engine.warm_error:
                raise RuntimeError(f"the warm-up answer failed: {self.engine.warm_error}")
            self.ready.set()
            print(f"tunesmith deploy: ready, serving {', '.join(self.models)}", flush=True)
        except UserError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 — reported, and the server stops instead of serving nothing
            log.exception("loading the model failed")
            self.error = f"loading the model failed: {type(e).__name__}: {e}"
        if self.error:
            print(f"error: {self.error}", file=sys.stderr)
            self.on_failure()

    def require_ready(self) -> None:
        if self.error:
            raise ApiError(503, f"The model could not be loaded: {self.error}", code="model_load_failed")
        if not self.ready.is_set():
            raise ApiError(503, "The model is still loading; retry in a few seconds.", code="model_loading")

    def resolve(self, name: str | None) -> ServedModel:
        self.require_ready()
        if name is None:  # like `tunesmith infer`: the first adapter, else the base model
            return next((m for m in self.models.values() if m.parent), next(iter(self.models.values())))
        if name not in self.models:
            raise ApiError(404, f"The model `{name}` does not exist. Served models: {', '.join(self.models)}.",
                           param="model", code="model_not_found")
        return self.models[name]

    def sampling(self, req: SamplingFields, max_tokens: int | None) -> SamplingConfig:
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported by this server.", param="logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        return with_defaults(self.defaults, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                             repetition_penalty=req.repetition_penalty, max_new_tokens=max_tokens, seed=req.seed,
                             min_new_tokens=req.min_tokens,
                             stop=tuple(s for s in stop if s) if stop is not None else None)

    def check_context(self, ids: list[int], param: str) -> None:
        limit = self.engine.capacity
        if len(ids) >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(ids)} tokens; shorten it.", param=param, code="context_length_exceeded")


# ---- the app -----------------------------------------------------------------------------------------------

def create_app(load_session: Callable[[], Session], args: DeployArgs) -> FastAPI:
    """The API + page. `load_session` runs in a background thread once the server is up (tests pass their own)."""
    backend = Backend(load_session, args)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The engine thread waits for each decode step with the GIL released; when the step ends it must get the
        # GIL back from the HTTP thread at once, or the GPU idles: Python's default hand-over interval is 5 ms,
        # about a whole decode step.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        threading.Thread(target=backend.load, name="tunesmith-load", daemon=True).start()
        yield
        if backend.engine is not None:
            await asyncio.to_thread(backend.engine.stop)
        sys.setswitchinterval(switch)

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, e: RequestValidationError):
        return validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        path = request.url.path
        message = {404: f"Unknown path {path}.", 405: f"{request.method} is not allowed on {path}."}
        return ApiError(e.status_code, message.get(e.status_code, str(e.detail))).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"Internal server error: {type(e).__name__}.", code="internal_error").response()

    async def authorize(request: Request) -> None:
        if not args.api_key:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), args.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>' with the server's "
                                "--api_key.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if backend.error:
            return JSONResponse({"status": "failed", "error": backend.error}, status_code=503)
        if not backend.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "models": list(backend.models), "in_flight": backend.engine.in_flight}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        backend.require_ready()
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "created": created, "owned_by": "tunesmith", "root": m.root,
             "parent": m.parent} for m in backend.models.values()]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        req = parse_body(ChatRequest, await read_json(request))
        served = backend.resolve(req.model)
        messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
        try:
            ids = backend.generator.chat_prompt(messages, served.system)
        except (jinja2.TemplateError, UserError) as e:
            raise ApiError(400, f"The chat template refused these messages: {e}", param="messages")
        backend.check_context(ids, "messages")
        cfg = backend.sampling(req, req.max_completion_tokens or req.max_tokens)
        prompts = [(ids, seeded(cfg, i)) for i in range(req.n)]
        return await respond(request, backend, served, prompts, len(ids), req, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        req = parse_body(CompletionRequest, await read_json(request))
        served = backend.resolve(req.model)
        if req.echo:
            raise ApiError(400, "echo is not supported by this server.", param="echo")
        texts = prompt_list(req.prompt)
        vocab = backend.generator.model.config.vocab_size
        tok, lm = backend.generator.tokenizer, backend.session.lm
        # Raw text gets the BOS token when the model's own chat template starts turns with one (Llama), as HF does.
        bos = tok.token_id(tok.special.get("bos_token")) if "bos_token" in lm.template.source else None
        id_lists = []
        for p in texts:
            ids = ([bos] if bos is not None else []) + tok.encode(p) if isinstance(p, str) else p
            if not ids:
                raise ApiError(400, "The prompt is empty.", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
            backend.check_context(ids, "prompt")
            id_lists.append(ids)
        cfg = backend.sampling(req, req.max_tokens if req.max_tokens is not None else 16)  # OpenAI's default: 16
        prompts = [(ids, seeded(cfg, j)) for ids in id_lists for j in range(req.n)]
        return await respond(request, backend, served, prompts, sum(map(len, id_lists)), req, chat=False)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def chat_message(m: ChatMessage, i: int) -> dict:
    """A template message from an OpenAI one: text parts joined; 'developer' is the newer name of 'system'."""
    role = "system" if m.role == "developer" else m.role
    if m.content is None or isinstance(m.content, str):
        return {"role": role, "content": m.content or ""}
    texts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}]: only text content parts are supported (got type "
                                f"'{part.get('type')}').", param=f"messages.{i}.content")
        texts.append(part["text"])
    return {"role": role, "content": "".join(texts)}


def prompt_list(prompt) -> list:
    """OpenAI's four prompt forms as a list of str or list[int]."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "The prompt is empty.", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def seeded(cfg: SamplingConfig, i: int) -> SamplingConfig:
    """Choice i of n: with a seed, each choice gets its own (seed + i) so the n answers differ reproducibly."""
    return cfg if cfg.seed is None or i == 0 else replace(cfg, seed=cfg.seed + i)


# ---- answering ---------------------------------------------------------------------------------------------

async def respond(request: Request, backend: Backend, served: ServedModel, prompts, prompt_tokens: int,
                  req: SamplingFields, chat: bool):
    job = Job(served.adapter, prompts, backend.args.request_timeout)
    try:
        backend.engine.submit(job)
    except EngineBusy as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": served.id, "system_fingerprint": None}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream_chunks(backend, job, head, prompt_tokens, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(cancel_on_disconnect(request, backend.engine, job))
    texts, finish, completion_tokens = [""] * len(prompts), [None] * len(prompts), 0
    try:
        async for i, d in job_events(backend.engine, job):
            texts[i] += d.text
            if d.finish_reason:
                finish[i], completion_tokens = d.finish_reason, completion_tokens + d.completion_tokens
    finally:
        watcher.cancel()
        backend.engine.cancel(job)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish))]
    return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


async def stream_chunks(backend: Backend, job: Job, head: dict, prompt_tokens: int, chat: bool, include_usage: bool):
    """SSE as OpenAI sends it: a role chunk per choice, content chunks, a finish chunk per choice, then (with
    include_usage) a chunk with empty choices and the usage, then `data: [DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice], **extra})

    completion_tokens = 0
    try:
        if chat:
            for i in range(len(job.prompts)):
                yield chunk(i, None, None, role=True)
        async for i, d in job_events(backend.engine, job):
            if d.text:
                yield chunk(i, d.text, None)
            if d.finish_reason:
                completion_tokens += d.completion_tokens
                yield chunk(i, None, d.finish_reason)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except ApiError as e:  # the status line is long gone: OpenAI's SDKs raise on an error event
        yield sse(e.body())
    finally:
        backend.engine.cancel(job)  # the client left (or we are done): free the slot
    yield "data: [DONE]\n\n"


async def job_events(engine: Engine, job: Job):
    """(choice index, Delta) pairs as the worker produces them; ApiError on failure or timeout."""
    while True:
        # The worker checks the deadline between tokens; this backstop also covers one very long step.
        remaining = job.deadline - time.monotonic() + 1.0
        try:
            if job.events.empty():
                kind, value = await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.0))
            else:  # already there: no timer, no task
                kind, value = job.events.get_nowait()
        except asyncio.TimeoutError:
            engine.cancel(job)
            raise ApiError(408, "The request took longer than the server's --request_timeout.", code="request_timeout")
        if kind == "end":
            return
        if kind == "failure":
            raise ApiError(value.status, value.message, code=value.code)
        yield value


async def cancel_on_disconnect(request: Request, engine: Engine, job: Job) -> None:
    """After the body is read, the next ASGI message is the disconnect: cancel the job when it comes."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.cancel(job)
            return


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
