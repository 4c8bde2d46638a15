"""`tunesmith deploy` end to end: a real uvicorn server on 127.0.0.1 serving the bundled SmolLM2 and a LoRA
adapter on it, driven by the official `openai` client (and httpx for raw bytes). Answers are checked against
tunesmith's own Generator with the same adapter active."""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from tunesmith.args import DeployArgs
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import LoadedModel
from tunesmith.model.lora import LoraConfig, apply_lora, lora_modules, save_adapter, set_active_adapter
from tunesmith.serve.app import create_app
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
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
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


# ---- the command -------------------------------------------------------------------------------------------

@pytest.mark.slow  # the tunesmith CLI in a subprocess, a real server
def test_deploy_command_serves_until_interrupted(tmp_path):
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
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/v1" in out


def test_deploy_command_errors_are_one_sentence(tmp_path, capsys):
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
