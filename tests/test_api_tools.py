"""`tunesmith deploy`'s tools, structured output, logprobs, penalties, logit_bias, seeds and n, end to end: one real
uvicorn server on the bundled SmolLM2 (module-scoped), driven by the official `openai` client and LangChain's
ChatOpenAI. SmolLM2-135M is weak: tool calls are forced (a named function or `required`), so constrained decoding
guarantees their form, and the round trip checks structure (call parsed, tool result rendered, final answer)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import torch

from test_serve import BASE, error_of, one_torch_thread, running, wait_ready
from tunesmith.args import DeployArgs
from tunesmith.serve.app import create_app
from tunesmith.serve.tools import for_template
from tunesmith.session import load_for_generation

KEY = "sk-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm):
    with one_torch_thread():
        args = DeployArgs(model=BASE, api_key=KEY, max_num_seqs=18, max_model_len=1024, max_concurrency=40)
        app = create_app(lambda: load_for_generation(args), args)
        with running(app) as url:
            wait_ready(url)
            yield url, app.state.backend


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server[0]}/v1/{route}", json={"model": BASE, **body}, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


def forced(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


FORCED_CALL = dict(model=BASE, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice=forced("get_weather"),
                   temperature=0, max_tokens=150)


@pytest.fixture(scope="module")
def weather_call(server):
    """The forced call's whole (non-streamed) answer, made once."""
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)
    return client.chat.completions.create(**FORCED_CALL)


@pytest.mark.slow  # a real uvicorn server
def test_tool_call_round_trip(client, server, weather_call):
    choice = weather_call.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])

    result = json.dumps({"city": args["city"], "temperature": 21, "unit": args["unit"], "sky": "sunny"})
    history = ASK_WEATHER + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = client.chat.completions.create(model=BASE, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                           temperature=0, max_tokens=80)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    # the call and its result reached the prompt in the model's template (SmolLM2's: the system-prompt form)
    backend = server[1]
    template = backend.generator.lm.template
    rendered, _ = for_template(history, None, False, template.default_system)
    text = template.render(rendered, add_generation_prompt=True)
    assert f"<tool_response>\n{result}\n</tool_response>" in text and '"name": "get_weather"' in text
    assert final.usage.prompt_tokens == len(backend.generator.tokenizer.encode(text))


@pytest.mark.slow  # a real uvicorn server
def test_streamed_tool_call_deltas_equal_the_whole_answer(client, weather_call):
    whole = weather_call.choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**FORCED_CALL, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) >= 2 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


@pytest.mark.slow  # a real uvicorn server
def test_required_tool_choice_gives_one_call_of_a_listed_function(client):
    r = client.chat.completions.create(model=BASE, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                       tool_choice="required", parallel_tool_calls=False, temperature=0.7, seed=3,
                                       max_tokens=150, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


@pytest.mark.slow  # a real uvicorn server
def test_json_schema_and_json_object_answers_parse(client, server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    q = [{"role": "user", "content": "Invent a person with pets, as JSON."}]
    r = client.chat.completions.create(model=BASE, messages=q, response_format=fmt, temperature=0.9, seed=5, n=2,
                                       max_tokens=60)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    r = client.chat.completions.create(model=BASE, messages=q, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=30)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of one JSON object
        assert r.choices[0].message.content.startswith("{")
    c = client.completions.create(model=BASE, prompt="A person as JSON:", max_tokens=80, temperature=0,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)


@pytest.mark.slow  # a real uvicorn server
def test_seed_gives_the_same_text_alone_and_beside_16_streams(client, server):
    kw = dict(model=BASE, messages=[{"role": "user", "content": "Write a short poem about rain."}],
              temperature=1.0, top_p=0.95, seed=1234, max_tokens=8)
    alone = client.chat.completions.create(**kw).choices[0].message.content
    batch = server[1].engine.batch
    others = [dict(model=BASE, messages=[{"role": "user", "content": f"Tell story number {i}."}], temperature=0.8,
                   max_tokens=24) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        busy = [pool.submit(client.chat.completions.create, **o) for o in others]
        deadline = time.monotonic() + 60
        while batch.active < 16:
            assert time.monotonic() < deadline, "the 16 streams did not start"
            time.sleep(0.02)
        rows, stop = [], threading.Event()
        watcher = threading.Thread(target=lambda: [rows.append(batch.active) or time.sleep(0.01)
                                                   for _ in iter(stop.is_set, True)])
        watcher.start()
        loaded = client.chat.completions.create(**kw).choices[0].message.content
        stop.set()
        watcher.join()
        for f in busy:
            assert f.result().choices[0].message.content is not None
    assert max(rows) == 17  # it decoded beside all 16
    assert loaded == alone
    other = client.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    assert other != alone  # the seed is what made them equal


def reference_logprobs(smollm, backend, messages, answer_ids):
    """The model's log-softmax after the prompt and each answer token (teacher forced), computed here."""
    ids = backend.generator.chat_prompt(messages)
    with torch.inference_mode():
        h = smollm.model(torch.tensor([ids + answer_ids]))[0, len(ids) - 1: len(ids) + len(answer_ids) - 1]
        return smollm.model.logits(h).float().log_softmax(-1)


@pytest.mark.slow  # a real uvicorn server
def test_top_logprobs_equal_our_log_softmax(client, server, smollm):
    backend = server[1]
    q = [{"role": "user", "content": "Name three colors."}]
    r = client.chat.completions.create(model=BASE, messages=q, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content) == r.choices[0].message.content
    token_bytes = backend.grammars.token_bytes
    vocab_bytes = {}
    for t in range(backend.generator.model.config.vocab_size):
        vocab_bytes.setdefault(token_bytes(t), t)
    answer = [vocab_bytes[bytes(e.bytes)] for e in content]
    ref = reference_logprobs(smollm, backend, q, answer)
    for row, entry in zip(ref, content):
        top = row.topk(5)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [token_bytes(int(i)) for i in top.indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-3)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the best one was taken
    # text completions: OpenAI's older shape
    c = client.completions.create(model=BASE, prompt="The sky is", max_tokens=4, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) <= 3 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = client.chat.completions.create(model=BASE, messages=q, temperature=0, max_tokens=6, logprobs=True,
                                              top_logprobs=2, stream=True)
    entries = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]


def greedy_with_penalties(smollm, backend, messages, n, presence=0.0, frequency=0.0, bias=None):
    """OpenAI's penalties and logit_bias over greedy decoding, written out here over full forwards."""
    ids = backend.generator.chat_prompt(messages)
    out, counts = [], torch.zeros(smollm.model.config.vocab_size)
    with torch.inference_mode():
        for _ in range(n):
            logits = smollm.model.logits(smollm.model(torch.tensor([ids + out]))[0, -1]).float()
            for t, b in (bias or {}).items():
                logits[t] += b
            logits -= frequency * counts + presence * (counts > 0)
            tok = int(logits.argmax())
            if tok in smollm.eos_token_ids:
                break
            out.append(tok)
            counts[tok] += 1
    return backend.generator.tokenizer.decode(out)


@pytest.mark.slow  # a real uvicorn server
def test_penalties_and_logit_bias_follow_openai_formulas(client, server, smollm):
    backend = server[1]
    q = [{"role": "user", "content": "Write the word 'hello' five times."}]
    plain = client.chat.completions.create(model=BASE, messages=q, temperature=0, max_tokens=10)
    assert plain.choices[0].message.content.lower().count("hello") >= 4
    for presence, frequency in ((0.0, 2.0), (1.5, 0.5)):
        pen = client.chat.completions.create(model=BASE, messages=q, temperature=0, max_tokens=10,
                                             presence_penalty=presence, frequency_penalty=frequency)
        got = pen.choices[0].message.content
        assert got == greedy_with_penalties(smollm, backend, q, 10, presence, frequency)
        assert got.lower().count("hello") < 4  # it stopped repeating
    tok = backend.generator.tokenizer.encode(" banana")[0]
    banned_first = backend.generator.tokenizer.encode(plain.choices[0].message.content)[0]
    bias = {str(tok): 20.0, str(banned_first): -100}
    biased = client.chat.completions.create(model=BASE, messages=q, temperature=0, max_tokens=10, logit_bias=bias)
    want = greedy_with_penalties(smollm, backend, q, 10, bias={tok: 20.0, banned_first: -100})
    assert biased.choices[0].message.content == want and "banana" in want


@pytest.mark.slow  # a real uvicorn server
def test_n_choices_share_one_prefill(client, server):
    batch = server[1].engine.batch
    q = [{"role": "user", "content": "Name an animal that lives in the sea."}]
    before = batch.prefilled_tokens
    r = client.chat.completions.create(model=BASE, messages=q, temperature=1.0, seed=1, n=4, max_tokens=5)
    assert len(r.choices) == 4
    assert batch.prefilled_tokens - before == r.usage.prompt_tokens  # once, not four times
    assert len({c.message.content for c in r.choices}) > 1  # each row sampled on its own


UNSUPPORTED = {  # a field that would change the answer is refused, naming it
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "high",
    "no_such_field": 1,
}


@pytest.mark.slow  # a real uvicorn server
def test_unsupported_and_bad_fields_are_400s_naming_them(server):
    q = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for name, value in UNSUPPORTED.items():
        r = post(server, "chat/completions", {**q, name: value})
        assert r.status_code == 400 and error_of(r)["param"] == name, (name, r.text)
        assert error_of(r)["code"] == "unsupported_parameter" and name in error_of(r)["message"]
    r = post(server, "chat/completions", {**q, "user": "u1", "metadata": {"k": "v"}, "store": False})
    assert r.status_code == 200, r.text  # harmless ones are accepted
    bad = {
        "tool_choice": {**q, "tools": [WEATHER], "tool_choice": forced("nope")},
        "tool_choice ": {**q, "tool_choice": "required"},
        "tools": {**q, "tools": [WEATHER, WEATHER]},
        "tools.0.function.name": {**q, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        "response_format": {**q, "tools": [WEATHER], "response_format": {"type": "json_object"}},
        "response_format.json_schema.schema": {**q, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}},
        "response_format.type": {**q, "response_format": {"type": "xml"}},
        "logit_bias": {**q, "logit_bias": {"10000000": 1}},
        "logit_bias ": {**q, "logit_bias": {"5": 300}},
        "presence_penalty": {**q, "presence_penalty": 3},
        "frequency_penalty": {**q, "frequency_penalty": -2.5},
        "top_logprobs": {**q, "top_logprobs": 3},
        "top_logprobs  ": {**q, "logprobs": True, "top_logprobs": 21},
        "messages.1.role": {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},
    }
    for param, body in bad.items():
        r = post(server, "chat/completions", body)
        assert r.status_code == 400 and error_of(r)["param"] == param.strip(), (param, r.text)
    for param, body in {"echo": {"echo": True}, "best_of": {"best_of": 2}, "suffix": {"suffix": "x"},
                        "logprobs": {"logprobs": 21}}.items():
        r = post(server, "completions", {"prompt": "hi", "max_tokens": 1, **body})
        assert r.status_code == 400 and error_of(r)["param"] == param, (param, r.text)


@pytest.mark.slow  # a real uvicorn server
def test_langchain_chat_openai_tool_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server[0]}/v1", api_key=KEY, model=BASE, temperature=0, max_tokens=150,
                     max_retries=0)
    ask = [HumanMessage("What is the weather in Tokyo?")]
    ai = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke(ask)
    [call] = ai.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
    final = llm.invoke(ask + [ai, ToolMessage(json.dumps({"temperature": 18}), tool_call_id=call["id"])])
    assert final.content and final.response_metadata["finish_reason"] == "stop"


def test_qwen_template_renders_tools_and_tool_messages_as_transformers(qwen_tiny_dir):
    """Qwen2.5's own template gets the tools and the tool-call messages (as transformers renders them)."""
    import transformers

    from tunesmith.model.load import load_template

    template = load_template(qwen_tiny_dir)
    hf = transformers.AutoTokenizer.from_pretrained(qwen_tiny_dir)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = ASK_WEATHER + [{"role": "assistant", "content": "", "tool_calls": [call]},
                              {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    msgs, tools = for_template(messages, [WEATHER], True, None)
    ours = template.render(msgs, add_generation_prompt=True, tools=tools)
    hf_messages = [dict(m, tool_calls=[dict(call, function=dict(call["function"], arguments=json.loads(
        call["function"]["arguments"])))]) if m.get("tool_calls") else m for m in messages]
    assert ours == hf.apply_chat_template(hf_messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "<tools>" in ours and "<tool_response>" in ours and '"arguments": {"city": "Paris"' in ours
