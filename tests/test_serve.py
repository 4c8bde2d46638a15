"""`tunesmith deploy` end to end: a real uvicorn server on 127.0.0.1 serving the bundled SmolLM2 and a LoRA
adapter on it, driven by the official `openai` client (and httpx for raw bytes). Answers are checked against
tunesmith's own Generator with the same adapter active."""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tunesmith.args import DeployArgs
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import LoadedModel
from tunesmith.model.lora import LoraConfig, apply_lora, lora_modules, save_adapter, set_active_adapter
from tunesmith.serve.app import create_app
from tunesmith.serve.server import Server, server_config
from tunesmith.session import load_for_generation

BASE = "smollm2-135m-instruct"
ADAPTER = "ident"
SYSTEM = "You are a helpful assistant."
KEY = "sk-test-key"


# ---- helpers shared with test_web.py -----------------------------------------------------------------------

@contextlib.contextmanager
def one_torch_thread():
    """The suite shares 2 CPU cores with other work; with 2 intra-op threads a busy neighbour makes OpenMP's spin
    barriers ~20x slower (measured 1.3 s vs 28 s for 8 tokens), with 1 thread it barely matters."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_adapter(lm: LoadedModel, out_dir: Path, name: str = ADAPTER) -> LoadedModel:
    """Save a non-trivial LoRA adapter (random B) for `lm` as a tunesmith checkpoint; return a copy of `lm` that
    carries it (the original, shared by other tests, is not touched)."""
    model = copy.deepcopy(lm.model)
    cfg = LoraConfig(r=8, alpha=32, dropout=0.0)
    apply_lora(model, cfg, name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B[name].weight.normal_(0.0, 0.01, generator=gen)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out_dir, cfg, str(lm.path), name)
    (out_dir / "args.json").write_text(json.dumps({"model": str(lm.path), "system": SYSTEM}))
    return dataclasses.replace(lm, model=model)


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread, set up as `tunesmith deploy` does
    (serve/server.py); yield its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = Server(server_config(app, log_level="warning", timeout_graceful_shutdown=2),
                    before_shutdown=lambda: app.state.backend.begin_shutdown())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.2)


# ---- fixtures ----------------------------------------------------------------------------------------------

class Reference:
    """What tunesmith's Generator answers, with the adapter active or not (cached: CPU time is scarce)."""

    def __init__(self, lm: LoadedModel):
        self.gen = Generator(lm)
        self._cache = {}

    def chat(self, model: str, messages: list[dict], max_tokens: int, stop: tuple[str, ...] = ()):
        key = (model, json.dumps(messages), max_tokens, stop)
        if key not in self._cache:
            set_active_adapter(self.gen.model, ADAPTER if model == ADAPTER else None)
            ids = self.gen.chat_prompt(messages, SYSTEM if model == ADAPTER else None)
            self._cache[key] = self.gen.complete(ids, SamplingConfig(max_new_tokens=max_tokens, stop=stop))
        return self._cache[key]


@dataclasses.dataclass
class Served:
    url: str
    app: object
    ref: Reference
    while_loading: dict

    @property
    def backend(self):
        return self.app.state.backend

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", KEY), **kw)


@pytest.fixture(scope="module")
def served(smollm, tmp_path_factory):
    with one_torch_thread():
        ckpt = tmp_path_factory.mktemp("serve") / "checkpoint-1"
        ref = Reference(make_adapter(smollm, ckpt))
        args = DeployArgs(model=BASE, adapters=[f"{ADAPTER}={ckpt}"], api_key=KEY, max_concurrency=8)
        gate = threading.Event()  # holds the load back so the test sees the server while it is loading

        def load():
            gate.wait(60)
            return load_for_generation(args)

        app = create_app(load, args)
        with running(app) as url:
            chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
            while_loading = {
                "health": httpx.get(f"{url}/health"),
                "chat": httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {KEY}"}),
            }
            gate.set()
            wait_ready(url)
            yield Served(url, app, ref, while_loading)


def ask(served: Served, model: str, content: str, max_tokens: int, **kw):
    return served.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens, **kw)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def wait_idle(served: Served, timeout: float = 10) -> float:
    t0 = time.monotonic()
    while served.backend.engine.in_flight:
        assert time.monotonic() - t0 < timeout, "the engine kept working for a gone client"
        time.sleep(0.05)
    return time.monotonic() - t0


# ---- tests -------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a real uvicorn server
def test_health_is_503_while_loading_then_200(served):
    assert served.while_loading["health"].status_code == 503
    assert served.while_loading["health"].json()["status"] == "loading"
    chat = served.while_loading["chat"]
    assert chat.status_code == 503 and error_of(chat)["code"] == "model_loading"
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    # before it said ready, the engine decoded a warm-up answer (on the GPU: compiled and recorded its step)
    assert served.backend.engine.warm.is_set() and served.backend.engine.warm_steps >= 3


@pytest.mark.slow  # a real uvicorn server
def test_models_lists_base_and_adapter_with_parent(served):
    models = {m.id: m for m in served.client().models.list()}
    assert set(models) == {BASE, ADAPTER}
    assert models[ADAPTER].parent == BASE
    assert models[BASE].parent is None


@pytest.mark.slow  # a real uvicorn server
def test_chat_answers_match_generator_for_base_and_adapter(served):
    q = [{"role": "user", "content": "What is your name?"}]
    answers = {}
    for model in (BASE, ADAPTER):
        r = ask(served, model, q[0]["content"], 12)
        want = served.ref.chat(model, q, 12)
        assert r.model == model and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
        assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens
        answers[model] = r.choices[0].message.content
    assert answers[BASE] != answers[ADAPTER]  # the adapter really runs, and the base really runs without it


@pytest.mark.slow  # a real uvicorn server
def test_adapter_gets_its_training_system_prompt_and_a_given_one_wins(served):
    q = [{"role": "user", "content": "What is your name?"}]
    with_default = served.ref.chat(ADAPTER, q, 12)
    explicit = [{"role": "system", "content": SYSTEM}] + q
    r = served.client().chat.completions.create(model=ADAPTER, messages=explicit, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == with_default.text
    assert r.usage.prompt_tokens == with_default.prompt_tokens
    # text parts are joined like a plain string
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                          {"type": "text", "text": "your name?"}]}]
    r = served.client().chat.completions.create(model=ADAPTER, messages=parts, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == with_default.text


@pytest.mark.slow  # a real uvicorn server
def test_streamed_chat_is_openai_shaped_and_equals_the_whole_answer(served):
    q = [{"role": "user", "content": "What is your name?"}]
    want = served.ref.chat(ADAPTER, q, 12)
    chunks = list(served.client().chat.completions.create(
        model=ADAPTER, messages=q, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want.text
    assert len(chunks) > 4  # really streamed, piece by piece

    # the raw bytes: `data: {json}` events separated by blank lines, ending in `data: [DONE]`
    body = {"model": BASE, "messages": q, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all("usage" not in p for p in payloads)  # no usage field unless include_usage was asked for
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


@pytest.mark.slow  # a real uvicorn server
def test_stop_strings_and_token_limits(served):
    q = [{"role": "user", "content": "What is your name?"}]
    full = served.ref.chat(BASE, q, 12).text
    stop = full.split()[2]
    for given in (stop, [stop, "never-appears"]):
        r = ask(served, BASE, q[0]["content"], 12, stop=given)
        assert r.choices[0].message.content == full[: full.index(stop)]
        assert r.choices[0].finish_reason == "stop"
    r = ask(served, BASE, q[0]["content"], 3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = served.client().chat.completions.create(model=BASE, messages=q, temperature=0, max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


@pytest.mark.slow  # a real uvicorn server
def test_n_choices_and_seeded_sampling(served):
    kw = dict(model=BASE, messages=[{"role": "user", "content": "Say a color."}], temperature=1.0, max_tokens=4,
              seed=7, n=2)
    a = served.client().chat.completions.create(**kw)
    b = served.client().chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # the seed holds
    prompt = served.ref.gen.chat_prompt(kw["messages"])
    assert a.usage.prompt_tokens == len(prompt)  # the prompt counts once, however many choices
    assert 2 <= a.usage.completion_tokens <= 8


@pytest.mark.slow  # a real uvicorn server
def test_text_completions(served):
    prompt = "The capital of France is"
    gen = served.ref.gen
    set_active_adapter(gen.model, None)
    want = gen.complete(gen.tokenizer.encode(prompt), SamplingConfig(max_new_tokens=5))
    r = served.client().completions.create(model=BASE, prompt=prompt, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    streamed = served.client().completions.create(model=BASE, prompt=prompt, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text


@pytest.mark.slow  # a real uvicorn server
def test_errors_use_openai_envelope_and_status(served):
    q = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        served.client(api_key="wrong").chat.completions.create(model=BASE, messages=q, max_tokens=2)
    assert e.value.code == "invalid_api_key"
    assert error_of(httpx.get(f"{served.url}/v1/models"))["code"] == "invalid_api_key"

    with pytest.raises(openai.NotFoundError) as e:
        served.client().chat.completions.create(model="no-such-model", messages=q, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"

    with pytest.raises(openai.BadRequestError) as e:
        served.client().chat.completions.create(model=BASE, messages=[], max_tokens=2)
    assert e.value.param == "messages"

    with pytest.raises(openai.BadRequestError) as e:
        served.client().chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hello " * 9000}])
    assert e.value.code == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError) as e:
        served.client().chat.completions.create(model=BASE, messages=q, temperature=5)
    assert e.value.param == "temperature"

    auth = {"Authorization": f"Bearer {KEY}"}
    post = lambda **kw: httpx.post(f"{served.url}/v1/chat/completions", headers=auth, **kw)  # noqa: E731
    cases = {
        "bad json": (post(content=b'{"model": "x", "messages": ['), 400, None),
        "missing messages": (post(json={"model": BASE}), 400, "messages"),
        "not an object": (post(json=[1, 2]), 400, None),
        "bad role": (post(json={"messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role"),
        "image part": (post(json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400,
                       "messages.0.content"),
        "too large": (post(content=b"x" * (2 << 20)), 413, None),
        "unknown path": (httpx.get(f"{served.url}/v1/nothing", headers=auth), 404, None),
        "bad completion prompt": (httpx.post(f"{served.url}/v1/completions", headers=auth,
                                             json={"model": BASE, "prompt": [10**9]}), 400, "prompt"),
    }
    for name, (r, status, param) in cases.items():
        assert r.status_code == status, (name, r.status_code, r.text)
        assert error_of(r)["param"] == param, name


@pytest.mark.slow  # a real uvicorn server
def test_concurrent_clients_on_base_and_adapter_all_get_their_own_answer(served):
    questions = ["Name a fruit.", "What is 2+2?", "Say hello."]
    jobs = [(model, q) for q in questions for model in (BASE, ADAPTER)]
    wants = [served.ref.chat(m, [{"role": "user", "content": q}], 4).text for m, q in jobs]
    batch = served.backend.engine.batch
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: ask(served, job[0], job[1], 4).choices[0].message.content, jobs))
    assert got == wants
    # base and adapter served side by side: every step ran all rows in one pass, each with its own adapter (one
    # compiled graph on the GPU), never one pass per adapter
    assert batch.mix_adapters and batch._rows is not None and batch._rows.names == [ADAPTER]


@pytest.mark.slow  # a real uvicorn server
def test_disconnected_clients_free_the_engine(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": ADAPTER, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "temperature": 0}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={**body, "stream": True}, headers=auth) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert served.backend.engine.in_flight == 1
    assert wait_idle(served) < 5  # cancelled between tokens, not after 400 of them

    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=auth, timeout=1.0)
    assert wait_idle(served) < 5

    test_chat_answers_match_generator_for_base_and_adapter(served)  # and the next requests are answered right


@pytest.mark.slow  # a real uvicorn server
def test_busy_server_answers_429(served):
    engine = served.backend.engine
    body = {"model": BASE, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "stream": True}
    engine.max_requests = 1
    try:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the connection, which cancels the request
            assert r.status_code == 200 and next(lines).startswith("data: ")
            assert engine.in_flight == 1
            with pytest.raises(openai.RateLimitError) as e:
                served.client(max_retries=0).chat.completions.create(
                    model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert e.value.code == "rate_limit_exceeded"
    finally:
        engine.max_requests = 8
    wait_idle(served)


@pytest.mark.slow  # a real uvicorn server
def test_request_timeout(served):
    backend = served.backend
    args = backend.args
    backend.args = dataclasses.replace(args, request_timeout=0.5)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            served.client(max_retries=0).chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400)
        assert e.value.status_code == 408 and e.value.code == "request_timeout"
        with pytest.raises(openai.APIError, match="request_timeout"):  # mid-stream: an error event
            list(served.client(max_retries=0).chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400,
                stream=True))
    finally:
        backend.args = args
    wait_idle(served)


# ---- abuse: hostile sampling values, limits, edge inputs, slow clients, shutdown ---------------------------

HOSTILE_SAMPLING = {  # each passed the API's validation once and made every row of the decode step fail
    "temperature": {"temperature": 1e-38},
    "top_p": {"temperature": 1.0, "top_p": 1e-300},
    "repetition_penalty": {"temperature": 1.0, "repetition_penalty": 1e-300},
}


class LogRecords(logging.Handler):
    """What the server logs (root and uvicorn loggers, which include tunesmith.serve), with tracebacks."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record))

    def tracebacks(self) -> list[str]:
        return [line for line in self.lines if "Traceback (most recent call last)" in line]


@pytest.fixture
def server_log():
    handler = LogRecords()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]  # uvicorn's do not propagate to the root
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


@pytest.fixture(scope="module")
def open_served(smollm):
    """A server as `tunesmith deploy` starts by default: no --api_key, the base model only."""
    with one_torch_thread():
        args = DeployArgs(model=BASE, max_concurrency=32)
        app = create_app(lambda: load_for_generation(args), args)
        with running(app) as url:
            wait_ready(url)
            yield Served(url, app, Reference(smollm), {})


@pytest.fixture
def short_timeouts(monkeypatch):
    """A half-sent head or body is given up on after 1 s instead of 10 / 30."""
    import tunesmith.serve.app as app_module
    from tunesmith.serve.server import HeadTimeoutProtocol

    monkeypatch.setattr(app_module, "BODY_TIMEOUT", 1.0)
    monkeypatch.setattr(HeadTimeoutProtocol, "head_timeout", 1.0)


def raw_http(url: str, data: bytes, wait: float = 6.0, close_after_send: bool = False) -> tuple[bytes, float, bool]:
    """Send raw bytes on a new connection; return (what came back, seconds until the server closed or `wait`
    ran out, whether the server closed the connection)."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        if close_after_send:
            return b"", 0.0, False
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return out, time.monotonic() - t0, False
            if not chunk:
                return out, time.monotonic() - t0, True
            out += chunk


def raw_error(reply: bytes) -> tuple[int, dict]:
    """Status and error envelope of a raw HTTP/1.1 response."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    err = json.loads(body)
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
    return status, err["error"]


def stream_events(url: str, body: dict, headers: dict, first=None, timeout: float = 120) -> list:
    """The events of a streamed request (parsed JSON, or the string '[DONE]'); `first()` is called once the first
    content has arrived."""
    events = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            events.append("[DONE]" if data == "[DONE]" else json.loads(data))
            if first is not None and data != "[DONE]" and "error" not in events[-1] and any(
                    c.get("delta", {}).get("content") or c.get("text") for c in events[-1]["choices"]):
                first()
                first = None
    return events


def streamed_text(events: list) -> tuple[str, list]:
    """The streamed answer of one choice and the error events among `events`."""
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    text = "".join(c.get("delta", {}).get("content") or c.get("text", "") for e in events
                   if isinstance(e, dict) and "choices" in e for c in e["choices"])
    return text, errors


def test_sampler_guards_hostile_values_and_unusable_logits(smollm):
    from tunesmith.decode.sampling import sample
    from tunesmith.decode.slots import DecodeSlots

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 30
    seen = torch.zeros(50, dtype=torch.bool)
    seen[:25] = True
    for kw in [*HOSTILE_SAMPLING.values(), {"temperature": 1e300}, {"temperature": float("nan")},
               {"temperature": 1.0, "repetition_penalty": 1e300}, {"temperature": 1.0, "top_p": float("nan")},
               {"temperature": 1e-30, "top_k": 3}]:
        assert 0 <= int(sample(logits, seen, SamplingConfig(**kw), None)) < 50, kw
    bad = torch.full((50,), float("nan"))
    bad[7] = 3.0
    assert int(sample(bad, None, SamplingConfig(temperature=1.0), None)) == 7  # unusable: the greedy token
    bad[9] = float("inf")
    assert int(sample(bad, None, SamplingConfig(temperature=0.7, top_p=0.5), None)) == 9

    # in one batch, a hostile row beside two greedy ones: those two answer as they do alone
    with one_torch_thread():
        gen = Generator(smollm)
        prompts = [gen.chat_prompt([{"role": "user", "content": c}]) for c in ("Name a fruit.", "Say hello.")]
        want = [gen.complete(p, SamplingConfig(max_new_tokens=6)).text for p in prompts]
        for hostile in HOSTILE_SAMPLING.values():
            slots = DecodeSlots(gen, 3, 128)
            slots.join(0, prompts[0], SamplingConfig(max_new_tokens=6))
            slots.join(1, prompts[1], SamplingConfig(max_new_tokens=6))
            slots.join(2, prompts[0], SamplingConfig(max_new_tokens=6, **hostile))
            texts, ended = ["", "", ""], set()
            while len(ended) < 3:
                for key, d in slots.step():
                    texts[key] += d.text
                    if d.finish_reason:
                        ended.add(key)
            assert texts[:2] == want, hostile


def test_infer_refuses_unsafe_sampling_values_in_one_sentence(capsys):
    from tunesmith.cli import main

    for flags, said in ((["--top_p", "1e-300", "--temperature", "1"], "--top_p 1e-300: it must be at least 0.0001"),
                        (["--temperature", "1e-38"], "--temperature 1e-38: it must be 0 or at least 0.0001"),
                        (["--repetition_penalty", "1e-300", "--temperature", "1"],
                         "--repetition_penalty 1e-300: it must be at least 0.01")):
        assert main(["infer", "--model", BASE, "--query", "hi", "--max_new_tokens", "4", *flags]) == 1
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # a real uvicorn server
def test_hostile_sampling_values_do_not_end_other_streams(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{served.url}/v1/chat/completions"
    q = [{"role": "user", "content": "What is your name?"}]
    want = served.ref.chat(BASE, q, 24).text
    body = {"model": BASE, "messages": q, "max_tokens": 24, "temperature": 0, "stream": True}
    for param, hostile in HOSTILE_SAMPLING.items():
        decoding = threading.Barrier(3)  # both streams have their first token: the hostile request joins them
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(stream_events, url, body, auth, lambda d=decoding: d.wait(30)) for _ in range(2)]
            decoding.wait(30)
            r = httpx.post(url, json={**body, **hostile}, headers=auth, timeout=60)
            results = [streamed_text(f.result()) for f in streams]
        assert r.status_code == 400 and error_of(r)["param"] == param, (param, r.text[:300])
        assert results == [(want, []), (want, [])], param  # the other two got their full answers
    wait_idle(served)


@pytest.mark.slow  # a real uvicorn server
def test_request_size_limits(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    cap = served.backend.engine.capacity
    q = [{"role": "user", "content": "hi"}]
    chat = lambda **kw: httpx.post(f"{served.url}/v1/chat/completions", headers=auth, timeout=10,  # noqa: E731
                                   json={"model": BASE, "messages": q, "max_tokens": 1, **kw})
    comp = lambda **kw: httpx.post(f"{served.url}/v1/completions", headers=auth, timeout=10,  # noqa: E731
                                   json={"model": BASE, "max_tokens": 1, **kw})
    cases = {
        "600 prompts": (comp(prompt=["hi"] * 600), "prompt"),
        "300 prompts x n=2": (comp(prompt=["hi"] * 300, n=2), "prompt"),
        "n=17": (chat(n=17), "n"),
        "max_tokens past the model length": (chat(max_tokens=cap + 1), "max_tokens"),
        "max_completion_tokens past it": (chat(max_completion_tokens=10**12), "max_completion_tokens"),
        "min_tokens past it": (chat(min_tokens=10**12), "min_tokens"),
        "17 stop strings": (chat(stop=[f"s{i}" for i in range(17)]), "stop"),
        "temperature 1e-5": (chat(temperature=1e-5), "temperature"),
        "top_p 1e-5": (chat(top_p=1e-5), "top_p"),
        "repetition_penalty 1e300": (chat(repetition_penalty=1e300), "repetition_penalty"),
    }
    for name, (r, param) in cases.items():
        assert r.status_code == 400 and error_of(r)["param"] == param, (name, r.status_code, r.text[:300])
    for ok in (chat(max_tokens=cap), chat(n=16), chat(temperature=1e-4, top_p=1e-4, repetition_penalty=0.01),
               chat(seed=2**64 - 1, n=2, temperature=1.0), chat(top_k=10**30, temperature=1.0)):
        assert ok.status_code == 200, ok.text
    wait_idle(served)


@pytest.mark.slow  # a real uvicorn server; 300 prompts on the CPU
def test_many_prompts_do_not_starve_another_chat(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": BASE, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2,
            "temperature": 0, "stream": True}

    def first_token_seconds() -> float:
        t0, seen = time.monotonic(), []
        stream_events(f"{served.url}/v1/chat/completions", chat, auth, lambda: seen.append(time.monotonic() - t0))
        return seen[0]

    alone = first_token_seconds()
    big = {"model": BASE, "prompt": [f"Story number {i}:" for i in range(300)], "max_tokens": 8, "temperature": 0,
           "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=big, headers=auth, timeout=120) as r:
        lines = r.iter_lines()  # held: a dropped iterator closes the connection, which cancels the request
        next(lines)  # the 300 prompts are decoding
        busy = first_token_seconds()
        still = served.backend.engine.in_flight
    wait_idle(served, 60)
    print(f"time to first token: alone {alone:.2f} s, beside a 300-prompt request {busy:.2f} s")
    assert busy < alone + 2.0, (alone, busy)  # it joined at once, not behind the 300 prompts
    assert still == 1  # the chat was done before the 300 prompts were


@pytest.mark.slow  # a real uvicorn server
def test_without_api_key_only_loopback_hosts_and_json_bodies(open_served, server_log):
    url, port = open_served.url, open_served.url.rsplit(":", 1)[1]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    for host in ("evil.example", f"evil.example:{port}", "10.0.0.1", "localhost.evil.example", "127.0.0.1.nip.io",
                 "[::2]", "0.0.0.0"):
        for r in (httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Host": host}),
                  httpx.get(f"{url}/v1/models", headers={"Host": host}), httpx.get(url, headers={"Host": host})):
            assert r.status_code == 403 and error_of(r)["code"] == "host_not_allowed", (host, r.text)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(chat).encode(),
                       headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type", (ctype, r.text)
    r = httpx.post(f"{url}/v1/completions", content=json.dumps({"prompt": "hi", "max_tokens": 1}).encode(),
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert not server_log.tracebacks()


EDGE_BODIES = {  # raw request bodies that must each be a 400 in the envelope
    "lone surrogate escape": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "lone surrogate bytes": b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}',
    "lone surrogate in a part": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
    "lone surrogate in a key": b'{"messages": [{"role": "user", "content": "x"}], "\\ud800": 1}',
    "lone surrogate in stop": b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udbff"]}',
    "50,000 nested arrays": b"[" * 50_000 + b"]" * 50_000,
    "50,000 nested objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "deep inside a field": b'{"messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 5_000 + b"]" * 5_000
                           + b"}",
    "empty": b"",
    "truncated": b'{"messages": [{"role": "us',
    "not UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "null": b"null",
    "a string": b'"hello"',
    "a number": b"12",
    "NaN temperature": b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "Infinity max_tokens": b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
    "float n": b'{"messages": [{"role": "user", "content": "x"}], "n": 1.5}',
    "huge seed": b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e30}',
    "content a number": b'{"messages": [{"role": "user", "content": 5}]}',
    "part without text": b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
    "messages an object": b'{"messages": {"role": "user"}}',
    "stream_options a string": b'{"messages": [{"role": "user", "content": "x"}], "stream_options": "x"}',
}


@pytest.mark.slow  # a real uvicorn server
def test_edge_inputs_are_400s_in_the_envelope(served, server_log):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for name, body in EDGE_BODIES.items():
        r = httpx.post(f"{served.url}/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
        error_of(r)
    for prompt in ("\ud800", [[]], [-1], [[1], "x"], [""] if served.backend.generator.tokenizer.special.get(
            "bos_token") is None else []):
        r = httpx.post(f"{served.url}/v1/completions", headers=headers,
                       content=json.dumps({"prompt": prompt}).encode())
        assert r.status_code == 400, (prompt, r.text)
        error_of(r)
    assert not server_log.tracebacks(), server_log.tracebacks()


@pytest.mark.slow  # a real uvicorn server
def test_half_sent_requests_time_out_and_gone_clients_log_one_line(served, server_log, short_timeouts):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n")
    reply, seconds, closed = raw_http(served.url, head + b'{"messages": [')  # slow loris: the body stops
    status, err = raw_error(reply)
    assert status == 408 and err["code"] == "request_timeout" and seconds < 4
    reply, seconds, closed = raw_http(served.url, head[:60])  # the head stops
    assert closed and reply == b"" and seconds < 4

    raw_http(served.url, head + b'{"messages": [', close_after_send=True)  # the client leaves mid-body
    deadline = time.monotonic() + 5
    while not any("disconnected before sending the whole body" in line for line in server_log.lines):
        assert time.monotonic() < deadline, server_log.lines
        time.sleep(0.05)
    time.sleep(0.3)
    assert not server_log.tracebacks(), server_log.tracebacks()
    assert sum("disconnected" in line for line in server_log.lines) == 1, server_log.lines
    assert httpx.get(f"{served.url}/health").status_code == 200


@pytest.mark.slow  # a real uvicorn server, about a minute of abuse on the CPU
def test_abuse_run(open_served, server_log, short_timeouts):
    """Hostile and malformed requests (loopback only, bounded) beside two ordinary streams: no 5xx, every error in
    OpenAI's envelope, the streams get their full answers, /health answers in under 0.5 s throughout."""
    url = open_served.url
    chat_url, comp_url = f"{url}/v1/chat/completions", f"{url}/v1/completions"
    q = [{"role": "user", "content": "What is your name?"}]
    want = open_served.ref.chat(BASE, q, 24).text
    js = {"Content-Type": "application/json"}
    post = lambda u, body, **kw: httpx.post(u, content=body if isinstance(body, bytes) else  # noqa: E731
                                            json.dumps(body).encode(), headers=kw.pop("headers", js), timeout=120)

    abuse = []  # (name, callable returning an httpx.Response, or a raw reply checked in place)
    for param, hostile in HOSTILE_SAMPLING.items():
        abuse.append((f"hostile {param}", lambda h=hostile: post(chat_url, {"messages": q, "max_tokens": 4, **h})))
        abuse.append((f"hostile {param} stream", lambda h=hostile: post(
            chat_url, {"messages": q, "max_tokens": 4, "stream": True, **h})))
    for name, body in EDGE_BODIES.items():
        abuse.append((name, lambda b=body: post(chat_url, b)))
    limits = {"600 prompts": (comp_url, {"prompt": ["hi"] * 600, "max_tokens": 1}),
              "300 x n=2": (comp_url, {"prompt": ["hi"] * 300, "n": 2, "max_tokens": 1}),
              "n=17": (chat_url, {"messages": q, "n": 17}),
              "max_tokens": (chat_url, {"messages": q, "max_tokens": 10**9}),
              "stop x 100": (chat_url, {"messages": q, "stop": ["x"] * 100}),
              "context": (chat_url, {"messages": [{"role": "user", "content": "hello " * 170_000}]}),
              "too large": (chat_url, b'{"x": "' + b"a" * (2 << 20) + b'"}'),
              "unknown model": (chat_url, {"messages": q, "model": "nope"})}
    for name, (u, body) in limits.items():
        abuse.append((name, lambda u=u, b=body: post(u, b)))
    for host in ("evil.example", "10.0.0.1", "localhost.evil.example"):
        abuse.append((f"host {host}", lambda h=host: post(chat_url, {"messages": q}, headers={**js, "Host": h})))
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        abuse.append((f"type {ctype}", lambda c=ctype: post(chat_url, {"messages": q}, headers={"Content-Type": c})))
    abuse += [("unknown path", lambda: httpx.get(f"{url}/v1/nothing", timeout=30)),
              ("wrong method", lambda: httpx.get(chat_url, timeout=30)),
              ("dot-dot", lambda: httpx.get(f"{url}/static/..%2f..%2fapp.py", timeout=30)),
              ("300 prompts", lambda: post(comp_url, {"prompt": [f"Item {i}:" for i in range(300)], "max_tokens": 1}))]
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    raw = {"slow body": head + b'{"messages": [', "slow head": head[:50]}
    for i in range(10):
        abuse.append((f"gone mid-body {i}", lambda: raw_http(url, head + b"{", close_after_send=True)))
    for name, data in raw.items():
        for i in range(5):
            abuse.append((f"{name} {i}", lambda d=data: raw_http(url, d)))

    health, stop = [], threading.Event()

    def poll_health():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status = httpx.get(f"{url}/health", timeout=5).status_code
            except httpx.TimeoutException:
                status = None
            health.append((time.monotonic() - t0, status))
            time.sleep(0.05)

    def run(item):
        name, call = item
        out = call()
        if isinstance(out, httpx.Response):
            if out.status_code >= 400:
                error_of(out)
            return name, out.status_code
        reply, seconds, closed = out
        if name.startswith("slow body"):
            status, _ = raw_error(reply)
            return name, status
        if name.startswith("slow head"):
            assert closed and seconds < 4, (name, reply, seconds)
        return name, 0

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    body = {"messages": q, "max_tokens": 24, "temperature": 0, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(stream_events, chat_url, body, js) for _ in range(2)]
        results = list(pool.map(run, abuse))
        answers = [streamed_text(f.result()) for f in streams]
    stop.set()
    poller.join(10)
    wait_idle(open_served, 60)

    statuses = dict(results)
    server_errors = {n: s for n, s in statuses.items() if s >= 500}
    worst = max(t for t, _ in health)
    print(f"abuse run: {len(abuse)} abusive requests, {len(server_errors)} 5xx, "
          f"{len(server_log.tracebacks())} tracebacks, /health {len(health)} times, slowest {worst:.3f} s")
    assert not server_errors, server_errors
    assert statuses["300 prompts"] == 200 and statuses["slow body 0"] == 408
    assert all(400 <= s < 500 for n, s in statuses.items() if n != "300 prompts" and s), statuses
    assert answers == [(want, []), (want, [])]
    assert all(status == 200 for _, status in health) and worst < 0.5, worst
    assert not server_log.tracebacks(), server_log.tracebacks()


# ---- the command -------------------------------------------------------------------------------------------

@pytest.mark.slow  # the tunesmith CLI in a subprocess, a real server
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_deploy_command_serves_until_interrupted(tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "deploy", "--model", BASE, "--port", str(port),
                             "--api-key", KEY, "--served_model_name", "my-bot"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    signalled = False
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "tunesmith deploy did not become ready"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.3)
        models = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY).models.list()
        assert [m.id for m in models] == ["my-bot"]
        assert "<!doctype html>" in httpx.get(url).text.lower()
        # the signal comes while two answers stream: both end with an error event and [DONE], not cut off
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000,
                "temperature": 0, "stream": True}
        decoding = threading.Barrier(3)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streams = [pool.submit(stream_events, f"{url}/v1/chat/completions", body,
                                   {"Authorization": f"Bearer {KEY}"}, lambda: decoding.wait(30)) for _ in range(2)]
            decoding.wait(30)
            t0 = time.monotonic()
            proc.send_signal(getattr(signal, sig))
            signalled = True
            events = [f.result() for f in streams]
        ended = time.monotonic() - t0
    finally:
        if not signalled:  # (a second Ctrl-C would force the exit)
            proc.send_signal(getattr(signal, sig))
        out = proc.communicate(timeout=30)[0]
    for stream in events:
        text, errors = streamed_text(stream)
        assert text and stream[-1] == "[DONE]" and [e["code"] for e in errors] == ["server_shutdown"], stream[-3:]
    assert ended < 3  # ended at once, not when uvicorn's graceful shutdown ran out
    # uvicorn stops on SIGINT, and on SIGTERM re-raises it after the graceful shutdown (the default action: exit)
    assert proc.returncode == (0 if sig == "SIGINT" else -signal.SIGTERM), out
    assert f"http://127.0.0.1:{port}/v1" in out and "Traceback" not in out


@pytest.fixture
def keep_uvicorn_logging():
    """`tunesmith deploy` in this process configures uvicorn's loggers to write to the test's captured stderr; put
    back what they were, or the servers still running in this module log to a closed stream when they stop."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    yield
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_deploy_command_errors_are_one_sentence(tmp_path, capsys, keep_uvicorn_logging):
    from tunesmith.cli import main

    assert main(["deploy"]) == 1
    assert "no --model or --adapters" in capsys.readouterr().err
    assert main(["deploy", "--adapters", f"x={tmp_path / 'missing'}"]) == 1
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert main(["deploy", "--model", BASE, "--max_num_seqs", "0"]) == 1
    assert "--max_num_seqs 0: it must be at least 1." in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["deploy", "--model", BASE, "--port", str(taken.getsockname()[1])]) == 1
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["deploy", "--model", str(empty), "--port", str(port)]) == 1  # the load fails after the port opened
    assert "no config.json" in capsys.readouterr().err
