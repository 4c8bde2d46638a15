"""Generation itself (decode/: Generator, DecodeSlots, sampling, TextOut, the static-cache step path), on the
bundled SmolLM2-135M-Instruct (CPU, fp32).

Greedy decoding is compared token for token with transformers' `generate` on the same GGUF (both loaders
dequantize the same Q4_1/Q8_0 blocks; logits differ by ~2e-5, far below any top-2 gap in these answers), and
with recomputing the whole sequence at every step. The `infer` command on top is tests/test_infer.py.
"""
# ruff: noqa: F811
# (the `adapted` fixture is imported from smollm_chat; pyflakes sees the tests' `adapted` parameter as a redefinition)

from __future__ import annotations

import pytest
import torch

from smollm_chat import QUESTION, SMOLLM, SYSTEM, adapted, greedy, one_thread, user  # noqa: F401 (fixtures)
from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import resolve_model_path

# ---- greedy decoding equals transformers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_smollm():
    import transformers

    path = resolve_model_path(SMOLLM)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.slow  # ~50 s with transformers' GGUF load
def test_greedy_equals_transformers_generate_with_and_without_cache_and_batched(smollm, hf_smollm):
    gen = Generator(smollm)
    poem = gen.chat_prompt(user("Write a short poem about the sea."))  # runs the full 64 tokens
    france = gen.chat_prompt(user("What is the capital of France?"))  # ends at <|im_end|> after 7 tokens
    ours = {}
    for name, ids in (("poem", poem), ("france", france)):
        c = gen.complete(ids, greedy(64))
        with torch.no_grad():
            hf = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                    eos_token_id=smollm.eos_token_ids, pad_token_id=0)[0, len(ids):].tolist()
        if c.finish_reason == "stop":
            assert hf == c.token_ids + [hf[-1]] and hf[-1] in smollm.eos_token_ids, name
        else:
            assert c.finish_reason == "length" and c.completion_tokens == 64 and hf == c.token_ids, name
        ours[name] = c
    assert ours["poem"].finish_reason == "length" and ours["france"].finish_reason == "stop"
    assert ours["france"].text == "The capital of France is Paris."

    # Without a KV cache every step recomputes the whole sequence: same tokens (first 24, to stay fast).
    ids = list(poem)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(smollm.model.logits(smollm.model(torch.tensor([ids]))[:, -1]).argmax()))
    assert ids[len(poem):] == ours["poem"].token_ids[:24]

    # Left-padded batch (prompts of different lengths) == each prompt alone.
    short = gen.chat_prompt(user("Hi"))
    batch = list(gen.complete_many([poem, short, france], greedy(64)))
    assert batch[0].token_ids == ours["poem"].token_ids and batch[0].finish_reason == "length"
    assert batch[2].token_ids == ours["france"].token_ids and batch[2].finish_reason == "stop"
    assert batch[1].token_ids == gen.complete(short, greedy(64)).token_ids


# ---- sampling, stops, lengths ---------------------------------------------------------------------------------


@pytest.mark.slow  # ~20 s
def test_sampling_controls(smollm):
    gen = Generator(smollm)
    ids = gen.chat_prompt(user("Tell me a story about a cat."))
    run = lambda **kw: gen.complete(ids, SamplingConfig(max_new_tokens=24, **kw))  # noqa: E731
    base = run(temperature=0.0)
    assert base.finish_reason == "length" and base.completion_tokens == 24 and len(base.token_ids) == 24

    a, b, c = run(temperature=1.0, seed=1), run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
    assert a.text == b.text and a.text != c.text
    assert a.text != base.text
    assert run(temperature=1.0, top_k=1, seed=3).token_ids == base.token_ids
    assert run(temperature=1.0, top_p=0.01, seed=3).token_ids == base.token_ids
    assert run(temperature=0.0, repetition_penalty=1.5).text != base.text

    # Stop strings: the text ends before the stop string, streamed deltas never show it, finish is 'stop'.
    cut = base.text.index(" cat")
    stopped = run(temperature=0.0, stop=(" cat",))
    assert stopped.text == base.text[:cut] and stopped.finish_reason == "stop"
    deltas = list(gen.stream(ids, greedy(24, stop=(" cat",))))
    assert "".join(d.text for d in deltas) == base.text[:cut] and deltas[-1].finish_reason == "stop"


@pytest.mark.slow  # over 5 s on 2 cores
def test_batch_equals_single_with_stop_strings_and_repetition_penalty(smollm):
    gen = Generator(smollm)
    prompts = [gen.chat_prompt(user("Tell me a story about a cat.")), gen.chat_prompt(user("Hi"))]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0, repetition_penalty=1.3, stop=(" cat",))
    for alone, together in zip([gen.complete(p, cfg) for p in prompts], gen.complete_many(prompts, cfg)):
        assert (together.text, together.finish_reason, together.token_ids) == \
            (alone.text, alone.finish_reason, alone.token_ids)


def test_incremental_detokenizing_equals_decoding_the_whole_answer(smollm):
    """TextOut decodes a small window per token; the pieces must add up to decoding everything at once, for text,
    for byte-level tokens that split characters, and for arbitrary ids, and a stop string still cuts exactly."""
    from tunesmith.decode.text import TextOut

    tok = smollm.tokenizer
    g = torch.Generator().manual_seed(0)
    cases = [tok.tok.encode("Hello there! 北京是中国的首都。 Ünïcödé ✓ " * 20).ids,
             torch.randint(0, smollm.model.config.vocab_size, (400,), generator=g).tolist()]
    for ids in cases:
        out = TextOut(tok, ())
        pieces = [out.push(t)[0] for t in ids] + [out.rest()]
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces[:-1]) or "\ufffd" in tok.decode(ids)
    ids = cases[0]
    out = TextOut(tok, ("首都",))
    text = ""
    for t in ids:
        piece, stopped = out.push(t)
        text += piece
        if stopped:
            break
    assert stopped and text + out.rest() == tok.decode(ids).split("首都")[0]


@pytest.mark.slow  # over 5 s on 2 cores
def test_chinese_streams_whole_characters(smollm):
    gen = Generator(smollm)
    ids = gen.chat_prompt(user("请用中文介绍一下北京。"), system="请用中文回答。")
    deltas = list(gen.stream(ids, greedy(40)))
    whole = gen.complete(ids, greedy(40))
    assert "北京" in whole.text
    # The answer really has characters split over several byte-level tokens (each decodes alone to U+FFFD) ...
    assert sum("\ufffd" in smollm.tokenizer.decode([t]) for t in whole.token_ids) > 10
    # ... yet no streamed piece holds half a character, and the pieces add up to the answer.
    assert not any("\ufffd" in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 40


# ---- the static-cache step path, the decode step's argmax ------------------------------------------------------


def recomputed_greedy(lm, prompt: list[int], cfg: SamplingConfig) -> list[int]:
    """Greedy decoding the textbook way, as a reference: the whole sequence through Decoder.forward at every step
    (no KV cache), with transformers' repetition penalty and end tokens ruled out until min_new_tokens."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for step in range(cfg.max_new_tokens):
            logits = lm.model.logits(lm.model(torch.tensor([ids]))[0, -1]).float()
            if step < cfg.min_new_tokens:
                logits[list(lm.eos_token_ids)] = float("-inf")
            if cfg.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(ids)))
                picked = logits[seen]
                logits[seen] = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
            tok = int(logits.argmax())
            if tok in lm.eos_token_ids:
                break
            ids.append(tok)
            out.append(tok)
    return out


@pytest.mark.slow  # ~35 s
def test_static_cache_path_gives_the_recomputed_tokens(smollm):
    """The CUDA decode path (static KV cache, one step shape for every token) runs eagerly on CPU: the tokens of
    recomputing the whole sequence at every step."""
    ids = Generator(smollm).chat_prompt(user("Write a short poem about the sea."))
    static = Generator(smollm, compiled=True, static_len=256)
    assert static.compiled
    assert static.complete(ids, greedy(48)).token_ids == recomputed_greedy(smollm, ids, greedy(48))
    # the step's own greedy picks (sampling.greedy_picks) with a repetition penalty, and end tokens ruled out
    # until min_new_tokens: a short answer that would end after a few tokens must go on, as the reference does
    short = Generator(smollm).chat_prompt(user("What is 2+2? Answer with the number only."))
    plain = Generator(smollm).complete(short, greedy(40))
    assert plain.finish_reason == "stop" and plain.completion_tokens < 20
    for cfg in (greedy(40, min_new_tokens=20), greedy(24, repetition_penalty=1.3)):
        want = recomputed_greedy(smollm, short, cfg)
        assert len(want) >= 20 and want[:20] != plain.token_ids[:20]
        assert static.complete(short, cfg).token_ids == want, cfg


def test_two_stage_argmax_equals_argmax_with_ties():
    """The decode step's argmax (sampling.argmax_rows: pieces, then the piece with the max) is argmax's, ties
    included (the first index), for vocabularies that do and do not split evenly."""
    from tunesmith.decode.sampling import argmax_rows

    g = torch.Generator().manual_seed(0)
    for V in (152064, 49152, 997):
        for _ in range(10):
            s = torch.randint(0, 4, (5, V), generator=g).float()  # ties everywhere
            assert torch.equal(argmax_rows(s), s.argmax(-1)), V
        s = torch.randn(2, V, generator=g)
        s[0] = float("-inf")
        s[1, -1] = 1e9
        assert argmax_rows(s).tolist() == [0, V - 1]


# ---- continuous batching ------------------------------------------------------------------------------------


@pytest.mark.slow  # ~30 s
def test_continuous_batching_equals_each_answer_alone_across_adapters(adapted):
    """Answers join and leave a DecodeSlots batch at different steps, with and without the adapter, greedy and
    sampled, with stop strings and token limits: each gets exactly what Generator.stream gives it alone."""
    from tunesmith.decode.slots import DecodeSlots
    from tunesmith.model.lora import set_active_adapter

    _, lm = adapted
    gen = Generator(lm)
    asks = [  # (adapter, question, config)
        ("default", QUESTION, greedy(40)),
        (None, QUESTION, greedy(40)),
        (None, "Tell me a story about a cat.", SamplingConfig(max_new_tokens=30, temperature=0.9, seed=7)),
        ("default", "What is the capital of France?", greedy(30, stop=(" Paris",))),
        (None, "Count from one to ten.", greedy(12, repetition_penalty=1.3)),
        ("default", "Count from one to ten.", SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=40,
                                                             repetition_penalty=1.2, seed=3)),
    ]
    prompts = [gen.chat_prompt(user(q), SYSTEM) for _, q, _ in asks]
    want = []
    for (adapter, _, cfg), ids in zip(asks, prompts):
        set_active_adapter(lm.model, adapter)
        want.append(gen.complete(ids, cfg))
    set_active_adapter(lm.model, "default")
    assert want[0].text != want[1].text  # the adapter matters

    slots = DecodeSlots(gen, rows=3, max_len=256)
    texts, ends, queue, steps = [""] * len(asks), [None] * len(asks), list(range(len(asks))), 0

    def take(events):
        for key, d in events:
            texts[key] += d.text
            if d.finish_reason:
                ends[key] = d
    passes, mixed = [], 0  # decode passes per step: one, also when the rows' adapters differ
    forward_static = gen.decoder.forward
    gen.decoder.forward = lambda ids, *a, **k: passes.append(ids.shape[1]) or forward_static(ids, *a, **k)
    try:
        while queue or slots.active:
            # join one per step while rows are free, so answers start at different steps and rows are reused
            if queue and slots.free_rows and steps % 2 == 0:
                k = queue.pop(0)
                take(slots.join(k, prompts[k], asks[k][2], asks[k][0]))
            decoding = {s.adapter for s in slots.streams if s is not None and s.prompt is None}
            mixed += len(decoding) > 1
            passes.clear()
            take(slots.step())
            assert passes.count(1) <= 1, passes
            steps += 1
    finally:
        gen.decoder.forward = forward_static
    for k, w in enumerate(want):
        assert (texts[k], ends[k].finish_reason, ends[k].completion_tokens) == \
            (w.text, w.finish_reason, w.completion_tokens), asks[k]
    assert steps < sum(w.completion_tokens for w in want)  # the answers really were decoded together
    assert mixed > 5  # many steps decoded rows of the adapter and of the base model together

    # Answers that join together are prefilled together: one forward per adapter among them (prompts of different
    # lengths padded after their end), or more when they exceed the prefill token budget; same answers.
    forwards = []
    prefill = gen.decoder.prefill
    gen.decoder.prefill = lambda ids, *a, **k: forwards.append(ids.shape) or prefill(ids, *a, **k)
    try:
        for budget, want_forwards in ((8192, 2), (40, 4)):
            together = DecodeSlots(gen, rows=4, max_len=256, prefill_tokens=budget)
            texts, ends, forwards[:] = [""] * 4, [None] * 4, []
            for k in range(4):
                assert together.join(k, prompts[k], asks[k][2], asks[k][0]) == []
            while together.active:
                take(together.step())
            assert len(forwards) == want_forwards, forwards  # adapter and base rows; then the budget splits more
            for k in range(4):
                assert (texts[k], ends[k].completion_tokens) == (want[k].text, want[k].completion_tokens), asks[k]
    finally:
        gen.decoder.prefill = prefill

    # Batch inference (continuous batching, in input order) keeps the adapter the caller chose.
    set_active_adapter(lm.model, "default")
    many = list(gen.complete_many([prompts[0], prompts[3], prompts[0]], greedy(40), rows=2))
    assert [c.text for c in many] == [want[0].text, gen.complete(prompts[3], greedy(40)).text, want[0].text]

    # A cancelled answer frees its row, and the token its step in flight made for it never becomes an event;
    # a prompt longer than a row is one sentence.
    slots.join("gone", prompts[0], greedy(40), "default")
    slots.step()  # its second token is now on the way
    assert slots.active == 1
    slots.leave("gone")
    assert slots.active == 0
    assert slots.step() == []
    with pytest.raises(UserError, match="the prompt has 300 tokens; at most 254 fit"):
        slots.join("long", list(range(300)), greedy(4))
