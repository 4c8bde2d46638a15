"""The OpenAI-compatible API and web chat page that `tunesmith deploy` serves (a FastAPI app; uvicorn runs it).

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET / (the chat page).
The request's `model` picks what answers: the base model or one of its adapters, all on one copy of the base
weights (engine.py runs them on one worker thread). Adapters get the system prompt they were trained with when a
conversation carries none; the base model gets its template's default (or --system when given).

The model loads in a background thread after the port opens: /health answers 503 until it is ready, then 200.
Every error is OpenAI's envelope {"error": {"message", "type", "param", "code"}} with the matching status; user
input never causes a 500.

Supported beyond plain sampling (both routes unless said): `n` (its rows share one prefill), `seed` (each row
its own generator: the same request gives the same text in any batch), `stop`, `logprobs` (+ `top_logprobs` on
chat, up to 20: the model's own log-softmax, before penalties, bias, masks and temperature), `presence_penalty`
and `frequency_penalty` (over the answer's own tokens), `logit_bias`, `response_format` (`json_object`,
`json_schema`: constrained decoding, decode/grammar.py), and on chat `tools`, `tool_choice` (`auto`, `none`,
`required` or a named function; the last two constrain the answer to well-formed calls), `parallel_tool_calls`,
`tool` messages and assistant `tool_calls` (serve/tools.py). A field that would change the answer and is not
supported is a 400 naming it; HARMLESS_FIELDS are accepted and ignored. Where we differ from OpenAI:
  * a request that runs past --request_timeout ends with 408 (mid-stream: an error event before [DONE]);
  * vLLM's extension fields `top_k`, `repetition_penalty` and `min_tokens` are accepted; echo is refused (400);
  * `tool_choice: "none"` leaves the tools out of the prompt; `response_format` with tools the model may call
    is refused (400): the answer is either free text with calls or constrained JSON;
  * sampling values outside decode/limits.py's numerically safe ranges are refused (400): temperature 0 or in
    [1e-4, 2], top_p in [1e-4, 1], repetition_penalty in [0.01, 100]; max_tokens at most the model length
    (--max_model_len), n at most 16, prompts x n at most MAX_CHOICES per request;
  * a body that has not fully arrived within BODY_TIMEOUT seconds is answered 408; JSON nested deeper than
    MAX_JSON_DEPTH, or holding a lone UTF-16 surrogate, is a 400;
  * without --api_key the server answers only requests whose Host is a loopback name (localhost, 127.0.0.1, [::1]:
    a web page cannot reach it through DNS rebinding) and JSON routes take only `Content-Type: application/json`
    (a cross-site form post cannot reach them); with --api_key the key guards both;
  * on shutdown, open streams end with an error event and `data: [DONE]` (serve/server.py).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
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
from starlette.requests import ClientDisconnect

from tunesmith.args import DeployArgs
from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.grammar import Grammar, GrammarError, Grammars, grammars_for
from tunesmith.decode.limits import (MAX_LOGIT_BIAS, MAX_PRESENCE_PENALTY, MAX_REPETITION_PENALTY, MAX_TOP_LOGPROBS,
                                     MIN_REPETITION_PENALTY, MIN_TEMPERATURE, MIN_TOP_P)
from tunesmith.decode.sampling import SamplingConfig, with_defaults
from tunesmith.runs import read_checkpoint_args
from tunesmith.serve.engine import Engine, EngineBusy, EngineStopping, Job, log
from tunesmith.serve.tools import ToolCallStream, for_template, parse_tool_calls, template_renders_tools
from tunesmith.session import Session, sampling_from

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # 1 MiB of JSON is ~250k tokens of text, far past any context we serve
DRAIN_LIMIT = 16 << 20  # an oversized body is read (and dropped) up to here so the client sees the 413
BODY_TIMEOUT = 30.0  # seconds for a request's whole body to arrive (a half-sent body must not hold a connection)
MAX_JSON_DEPTH = 64  # the deepest nesting a request body may have (OpenAI's requests need ~6)
MAX_N = 16  # choices per request
MAX_CHOICES = 512  # answers per request: prompts x n (each is a row of the batch for as long as it decodes)
MAX_STOP = 16  # stop strings per request (each is searched for after every token)
MAX_TOOLS = 128  # tool definitions per request
# Fields OpenAI's API has that cannot change an answer here: accepted and ignored. Any other field this server
# does not know is refused (400 naming it), so that a client never gets an answer that silently ignored it.
HARMLESS_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
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
        headers = {"Retry-After": "1"} if self.status in (429, 503) else {}
        if self.status in (408, 413):  # the body may be unread: the connection cannot carry another request
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- request bodies ----------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class SamplingFields(BaseModel):
    """Fields chat and text completions share. Fields outside the model are kept (extra="allow") and checked
    against HARMLESS_FIELDS (refuse_unknown)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None  # None: the first adapter, else the base model
    temperature: float | None = Field(None, ge=0, le=2)  # (0, MIN_TEMPERATURE) is refused by Backend.sampling
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # vLLM's extension: no end-of-turn before this many tokens (benchmarks)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_PRESENCE_PENALTY, le=MAX_PRESENCE_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PRESENCE_PENALTY, le=MAX_PRESENCE_PENALTY)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict = "{}"


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` and other labels do not reach the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)


def parse_body(cls: type[BaseModel], body) -> BaseModel:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors())
    refuse_unknown(req)
    return req


def refuse_unknown(req: BaseModel) -> None:
    """400 naming the first field this server does not support (HARMLESS_FIELDS excepted)."""
    for name in req.model_extra or {}:
        if name not in HARMLESS_FIELDS:
            raise ApiError(400, f"Unsupported parameter: '{name}' is not supported by this server, and answering "
                                f"without it could give a different answer than asked for; remove it.",
                           param=name, code="unsupported_parameter")


def validation_error(errors) -> ApiError:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # pydantic names the union member that failed ("messages.0.content.str"); the field path is what users know
    loc = [p for p in loc if not (p in ("str", "int", "dict", "bool", "list[str]", "list[int]", "list[dict]",
                                        "list[list[int]]")
                                  or p.startswith(("list[", "function-", "literal[", "dict[")))]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param)
    return ApiError(400, f"Invalid value for '{param}': {first.get('msg')}.", param=param)


async def read_json(request: Request, json_only: bool = False):
    """The JSON body, at most MAX_BODY bytes (413 beyond), fully arrived within BODY_TIMEOUT seconds (408), parsed
    (400 when it is not JSON, nests deeper than MAX_JSON_DEPTH or holds a lone surrogate). json_only: refuse
    bodies not declared `Content-Type: application/json` (415), which a web page can send elsewhere only after
    asking the server (CORS), so a cross-site form post never gets here."""
    if json_only:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, f"This route takes a JSON body sent with 'Content-Type: application/json' (got "
                                f"'{media or 'none'}').", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > MAX_BODY
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.stream():
                size += len(chunk)
                if size > DRAIN_LIMIT:
                    break
                if not too_big and size <= MAX_BODY:
                    chunks.append(chunk)
    except TimeoutError:
        log.warning("%s %s: the request body did not arrive within %.0f s", request.method, request.url.path,
                    BODY_TIMEOUT)
        raise ApiError(408, f"The request body did not arrive within {BODY_TIMEOUT:.0f} s.", code="request_timeout")
    except ClientDisconnect:  # nobody will read the answer: one line in the log, no traceback
        log.warning("%s %s: the client disconnected before sending the whole body", request.method, request.url.path)
        raise ApiError(400, "The client disconnected before sending the whole body.", code="client_disconnected")
    if too_big or size > MAX_BODY:
        raise ApiError(413, f"The request body is larger than {MAX_BODY >> 20} MiB.", code="request_too_large")
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request ({e}).", code="invalid_json")
    except RecursionError:
        raise too_deep()
    check_json(body)
    return body


def too_deep() -> ApiError:
    return ApiError(400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")


def check_json(value) -> None:
    """400 for a parsed body nested deeper than MAX_JSON_DEPTH or holding a string that is not valid Unicode (a lone
    surrogate such as "\\ud800", which JSON's escapes allow but no tokenizer or template can take)."""
    if isinstance(value, str):
        check_text(value)
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:  # iterative: no recursion for hostile nesting; numbers are skipped at once (a 1 MiB list of them)
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise too_deep()
        if isinstance(v, dict):
            for k in v:
                check_text(k)
            v = v.values()
        for x in v:
            if isinstance(x, str):
                check_text(x)
            elif isinstance(x, (list, dict)):
                stack.append((x, depth + 1))


def check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = s[e.start].encode("unicode_escape").decode()
        raise ApiError(400, f"The request holds a lone UTF-16 surrogate ({bad}), which is not valid Unicode text.",
                       code="invalid_json")


def is_loopback_host(host: str) -> bool:
    """Whether an HTTP Host header names this machine by a loopback name: localhost, 127.0.0.0/8 or [::1], any
    port. A DNS-rebinding page reaches a loopback port only under its own (non-loopback) name."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        name = host.split(":")[0]
    else:
        name = host
    name = name.rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class LoopbackHostOnly:
    """ASGI middleware: requests whose Host header is not a loopback name get a 403 in OpenAI's envelope (used
    when the server has no --api_key, so that no web page can drive it through DNS rebinding)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if not is_loopback_host(host):
                error = ApiError(403, f"Host '{host[:100]}' is not allowed: without --api_key this server answers only "
                                      f"requests to localhost, 127.0.0.1 or [::1]; start it with --api_key to "
                                      f"serve other names.", code="host_not_allowed")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
        self.grammars: Grammars | None = None

    def load(self) -> None:
        try:
            session = self._load_session()
            self.models = served_models(self.args, session)
            self.defaults = sampling_from(self.args, session.lm)
            self.session, self.generator = session, Generator(session.lm, compiled=self.args.torch_compile)
            # the tokenizer's grammar tables, made now rather than in the first constrained request
            self.grammars = grammars_for(session.lm.tokenizer, session.lm.model.config.vocab_size,
                                         session.lm.eos_token_ids)
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

    def sampling(self, req: SamplingFields, max_tokens: int | None, max_tokens_param: str = "max_tokens",
                 grammar: Grammar | None = None, logprobs: int | None = None) -> SamplingConfig:
        """The request's sampling values over the server's defaults, after the checks that pydantic's field bounds
        cannot express (one sentence naming the field)."""
        if req.temperature is not None and 0 < req.temperature < MIN_TEMPERATURE:
            raise ApiError(400, f"Invalid value for 'temperature': it must be 0 (greedy) or at least {MIN_TEMPERATURE} "
                                f"(got {req.temperature}).", param="temperature")
        limit = self.engine.capacity
        for name, value in ((max_tokens_param, max_tokens), ("min_tokens", req.min_tokens)):
            if value is not None and value > limit:
                raise ApiError(400, f"Invalid value for '{name}': {value} is more than this model's maximum length of "
                                    f"{limit} tokens (prompt + answer); ask for fewer.", param=name)
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if stop is not None and len(stop) > MAX_STOP:
            raise ApiError(400, f"Invalid value for 'stop': at most {MAX_STOP} stop strings (got {len(stop)}).",
                           param="stop")
        return with_defaults(self.defaults, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                             repetition_penalty=req.repetition_penalty, max_new_tokens=max_tokens, seed=req.seed,
                             min_new_tokens=req.min_tokens,
                             stop=tuple(s for s in stop if s) if stop is not None else None,
                             presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                             logit_bias=self.logit_bias(req.logit_bias), grammar=grammar, logprobs=logprobs)

    def logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...] | None:
        if not bias:
            return None
        vocab = self.generator.model.config.vocab_size
        out = []
        for key, value in bias.items():
            if not (key.isdigit() and int(key) < vocab):
                raise ApiError(400, f"Invalid value for 'logit_bias': keys are token ids in [0, {vocab}) (got "
                                    f"{key[:40]!r}).", param="logit_bias")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ApiError(400, f"Invalid value for 'logit_bias': biases lie in [-{MAX_LOGIT_BIAS:g}, "
                                    f"{MAX_LOGIT_BIAS:g}] (got {value} for token {key}).", param="logit_bias")
            out.append((int(key), float(value)))
        return tuple(out)

    def response_grammar(self, fmt: ResponseFormat | None) -> Grammar | None:
        """The grammar of a response_format (None for text); 400 naming it when its schema does not compile.
        Runs off the event loop (a new schema takes milliseconds to compile)."""
        if fmt is None or fmt.type == "text":
            if fmt is not None and fmt.json_schema is not None:
                raise ApiError(400, "Invalid value for 'response_format': json_schema is only read with type "
                                    "'json_schema'.", param="response_format")
            return None
        if fmt.type == "json_object":
            return self.grammars.json_schema(None)
        spec = fmt.json_schema
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise ApiError(400, "Missing required parameter: 'response_format.json_schema' (an object with 'name' "
                                "and 'schema').", param="response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, "Invalid value for 'response_format.json_schema.schema': a JSON schema is an object.",
                           param="response_format.json_schema.schema")
        try:
            return self.grammars.json_schema(schema)
        except GrammarError as e:
            raise ApiError(400, f"Invalid value for 'response_format.json_schema.schema': this schema cannot be "
                                f"used for constrained decoding ({e}).", param="response_format.json_schema.schema")

    def begin_shutdown(self) -> None:
        """The server is stopping: refuse new requests and end open ones now (serve/server.py calls this before
        uvicorn's graceful shutdown, so streams end with an error event and [DONE] instead of being cut)."""
        if self.engine is not None:
            self.engine.begin_stop()

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
    if not args.api_key:  # nothing else guards it: only this machine, by a loopback name (no DNS rebinding)
        app.add_middleware(LoopbackHostOnly)
    json_only = not args.api_key  # and no cross-site form posts (a key in a header already rules those out)

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
        req = parse_body(ChatRequest, await read_json(request, json_only))
        served = backend.resolve(req.model)
        messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
        tools, forced = tool_choice(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "Invalid value for 'top_logprobs': it needs 'logprobs' set to true.",
                           param="top_logprobs")
        if tools and req.response_format is not None and req.response_format.type != "text":
            raise ApiError(400, "Invalid value for 'response_format': it cannot be combined with tools the model may "
                                "call; set 'tool_choice' to 'none' or leave response_format out.",
                           param="response_format")

        def grammar() -> Grammar | None:
            if forced is None:
                return backend.response_grammar(req.response_format)
            try:
                # a named function: one call of it; 'required': one, or several unless parallel_tool_calls is false
                parallel = req.tool_choice == "required" and req.parallel_tool_calls is not False
                return backend.grammars.tool_calls(forced, parallel)
            except GrammarError as e:
                raise ApiError(400, f"Invalid value for 'tools': a function's parameters cannot be used for "
                                    f"constrained decoding ({e}).", param="tools")

        def prompt() -> list[int]:
            template = backend.session.lm.template
            msgs, listed = messages, None
            if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
                system = served.system if served.system is not None else template.default_system
                msgs, listed = for_template(messages, tools, template_renders_tools(template.source), system)
            return backend.generator.chat_prompt(msgs, served.system, listed)

        cfg = backend.sampling(req, req.max_completion_tokens or req.max_tokens,
                               "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                               await asyncio.to_thread(grammar),
                               (req.top_logprobs or 0) if req.logprobs else None)
        try:  # off the event loop: a long conversation takes a while to render and tokenize
            ids = await asyncio.to_thread(prompt)
        except (jinja2.TemplateError, UserError) as e:
            raise ApiError(400, f"The chat template refused these messages: {e}", param="messages")
        backend.check_context(ids, "messages")
        prompts = [(ids, seeded(cfg, i)) for i in range(req.n)]
        return await respond(request, backend, served, prompts, len(ids), req, chat=True, tools=bool(tools))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        req = parse_body(CompletionRequest, await read_json(request, json_only))
        served = backend.resolve(req.model)
        if req.echo:
            raise ApiError(400, "echo is not supported by this server.", param="echo")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "Invalid value for 'best_of': this server returns every choice it makes, so best_of "
                                "must equal n (or be left out).", param="best_of")
        texts = prompt_list(req.prompt)
        if len(texts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"This request asks for {len(texts) * req.n} answers ({len(texts)} prompts x "
                                f"n={req.n}); at most {MAX_CHOICES} per request.", param="prompt")
        grammar = await asyncio.to_thread(backend.response_grammar, req.response_format)
        cfg = backend.sampling(req, req.max_tokens if req.max_tokens is not None else 16,  # OpenAI's default: 16
                               grammar=grammar, logprobs=req.logprobs)
        vocab = backend.generator.model.config.vocab_size
        tok, lm = backend.generator.tokenizer, backend.session.lm
        # Raw text gets the BOS token when the model's own chat template starts turns with one (Llama), as HF does.
        bos = tok.token_id(tok.special.get("bos_token")) if "bos_token" in lm.template.source else None
        encoded = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else None for p in texts])
        id_lists = []
        for p, enc in zip(texts, encoded):
            ids = ([bos] if bos is not None else []) + enc if isinstance(p, str) else p
            if not ids:
                raise ApiError(400, "The prompt is empty.", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
            backend.check_context(ids, "prompt")
            id_lists.append(ids)
        prompts = [(ids, seeded(cfg, j)) for ids in id_lists for j in range(req.n)]
        return await respond(request, backend, served, prompts, sum(map(len, id_lists)), req, chat=False)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def chat_message(m: ChatMessage, i: int) -> dict:
    """A template message from an OpenAI one: text parts joined; 'developer' is the newer name of 'system'; an
    assistant's tool_calls and a tool message's tool_call_id kept (serve/tools.py renders them)."""
    role = "system" if m.role == "developer" else m.role
    if m.tool_calls and role != "assistant":
        raise ApiError(400, f"messages[{i}]: only assistant messages carry tool_calls.",
                       param=f"messages.{i}.tool_calls")
    if m.content is None or isinstance(m.content, str):
        out = {"role": role, "content": m.content or ""}
    else:
        texts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported (got type "
                                    f"'{part.get('type')}').", param=f"messages.{i}.content")
            texts.append(part["text"])
        out = {"role": role, "content": "".join(texts)}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    if role == "tool":
        out["tool_call_id"] = m.tool_call_id
    return out


def tool_choice(req: ChatRequest) -> tuple[list[dict] | None, list[dict] | None]:
    """(the tool definitions to render, or None; the functions a call is forced among, or None) from tools and
    tool_choice: 'none' renders no tools, 'auto' (the default with tools) lets the model choose, 'required'
    forces one or more calls, {"type": "function", "function": {"name": ...}} forces that function."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "Invalid value for 'tool_choice': it names a tool choice but the request has no "
                                "tools.", param="tool_choice")
        return None, None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    functions = [t["function"] for t in tools]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ApiError(400, "Invalid value for 'tools': two tools have the same function name.", param="tools")
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required":
        return tools, functions
    name = choice.get("function", {}).get("name") if choice.get("type") == "function" and isinstance(
        choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "Invalid value for 'tool_choice': 'none', 'auto', 'required' or {\"type\": "
                            "\"function\", \"function\": {\"name\": ...}}.", param="tool_choice")
    if name not in names:
        raise ApiError(400, f"Invalid value for 'tool_choice': no tool is named '{name[:64]}'.", param="tool_choice")
    return tools, [f for f in functions if f["name"] == name]


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
    return cfg if cfg.seed is None or i == 0 else replace(cfg, seed=(cfg.seed + i + 2**63) % 2**64 - 2**63)


# ---- answering ---------------------------------------------------------------------------------------------

async def respond(request: Request, backend: Backend, served: ServedModel, prompts, prompt_tokens: int,
                  req: SamplingFields, chat: bool, tools: bool = False):
    """Run the job and answer: whole, or as a stream. tools: the answers' tool-call blocks become tool_calls."""
    job = Job(served.adapter, prompts, backend.args.request_timeout)
    try:
        backend.engine.submit(job)
    except EngineStopping as e:
        raise ApiError(503, str(e), code="server_shutdown")
    except EngineBusy as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": served.id, "system_fingerprint": None}
    logprobs = Logprobs(backend, chat) if prompts[0][1].logprobs is not None else None
    one_call = getattr(req, "parallel_tool_calls", None) is False
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream_chunks(backend, job, head, prompt_tokens, chat, include_usage, tools,
                                               logprobs, one_call),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(cancel_on_disconnect(request, backend.engine, job))
    n = len(prompts)
    texts, finish, completion_tokens, lps = [""] * n, [None] * n, 0, [[] for _ in range(n)]
    try:
        async for i, d in job_events(backend.engine, job):
            texts[i] += d.text
            if d.logprobs:
                lps[i] += d.logprobs
            if d.finish_reason:
                finish[i], completion_tokens = d.finish_reason, completion_tokens + d.completion_tokens
    finally:
        watcher.cancel()
        backend.engine.cancel(job)
    choices = []
    for i, (t, f) in enumerate(zip(texts, finish)):
        if logprobs:
            logprobs.offset = 0
        lp = logprobs.block(lps[i]) if logprobs else None
        if not chat:
            choices.append({"index": i, "text": t, "logprobs": lp, "finish_reason": f})
            continue
        message = {"role": "assistant", "content": t}
        if tools:
            content, calls = parse_tool_calls(t)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls[:1] if one_call else calls}
                f = "tool_calls" if f == "stop" else f
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": f})
    return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


class Logprobs:
    """Logprob entries (decode/text.py Delta.logprobs) in OpenAI's shapes: chat's {"content": [{token, logprob,
    bytes, top_logprobs}]} or completions' {tokens, token_logprobs, top_logprobs, text_offset}."""

    def __init__(self, backend: Backend, chat: bool):
        self.grammars, self.tokenizer, self.chat = backend.grammars, backend.generator.tokenizer, chat
        self.offset = 0  # completions: characters of the answer before the next entry

    def token(self, t: int) -> tuple[str, list[int]]:
        raw = self.grammars.token_bytes(t)
        if not raw:  # a control token: its own spelling
            text = self.tokenizer.tok.id_to_token(t) or ""
            return text, list(text.encode())
        return raw.decode("utf-8", errors="replace"), list(raw)

    def block(self, entries: list) -> dict:
        if self.chat:
            content = []
            for tok, lp, top_ids, top_lps in entries:
                text, raw = self.token(tok)
                tops = [dict(zip(("token", "bytes"), self.token(t)), logprob=v) for t, v in zip(top_ids, top_lps)]
                content.append({"token": text, "logprob": lp, "bytes": raw,
                                "top_logprobs": [{"token": x["token"], "logprob": x["logprob"], "bytes": x["bytes"]}
                                                 for x in tops]})
            return {"content": content, "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp, top_ids, top_lps in entries:
            text = self.token(tok)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            tops: dict[str, float] = {}
            for t, v in zip(top_ids, top_lps):
                tops.setdefault(self.token(t)[0], v)
            out["top_logprobs"].append(tops)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


async def stream_chunks(backend: Backend, job: Job, head: dict, prompt_tokens: int, chat: bool, include_usage: bool,
                        tools: bool = False, logprobs: Logprobs | None = None, one_call: bool = False):
    """SSE as OpenAI sends it: a role chunk per choice, content chunks, a finish chunk per choice, then (with
    include_usage) a chunk with empty choices and the usage, then `data: [DONE]`. With tools, each call is two
    chunks: its index, id, type and name (arguments ""), then its arguments; the finish reason is 'tool_calls'."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}
    parsers = [ToolCallStream() for _ in job.prompts] if tools else None
    offsets = [0] * len(job.prompts)

    def chunk(i: int, delta: dict | str | None, finish: str | None, lp: list | None = None) -> str:
        block = None
        if lp and logprobs is not None:
            logprobs.offset = offsets[i]
            block = logprobs.block(lp)
            offsets[i] = logprobs.offset
        if chat:
            choice = {"index": i, "delta": delta or {}, "logprobs": block, "finish_reason": finish}
        else:
            choice = {"index": i, "text": delta or "", "logprobs": block, "finish_reason": finish}
        return sse({**head, "choices": [choice], **extra})

    def pieces(i: int, events: list) -> list[str]:
        out = []
        for kind, value in events:
            if kind == "content":
                out.append(chunk(i, {"content": value}, None))
            elif not (one_call and parsers[i].calls > 1):
                k = parsers[i].calls - 1
                fn = value["function"]
                out.append(chunk(i, {"tool_calls": [{"index": k, "id": value["id"], "type": "function",
                                                     "function": {"name": fn["name"], "arguments": ""}}]}, None))
                out.append(chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}, None))
        return out

    completion_tokens = 0
    try:
        if chat:
            for i in range(len(job.prompts)):
                yield chunk(i, {"role": "assistant", "content": ""}, None)
        async for i, d in job_events(backend.engine, job):
            if parsers is not None:
                out = pieces(i, parsers[i].feed(d.text))
                if d.finish_reason:
                    out += pieces(i, parsers[i].finish())
                for c in out:
                    yield c
                if d.logprobs:
                    yield chunk(i, None, None, d.logprobs)
            elif d.text or d.logprobs:
                yield chunk(i, {"content": d.text} if chat and d.text else (d.text if not chat else None), None,
                            d.logprobs)
            if d.finish_reason:
                completion_tokens += d.completion_tokens
                finish = d.finish_reason
                if parsers is not None and parsers[i].calls and finish == "stop":
                    finish = "tool_calls"
                yield chunk(i, None, finish)
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
