"""`--dataset general-distill#N`: general instruction data made offline by the *base* model itself.

The tutorial's "mixed data" step mixes hub datasets (alpaca-gpt4) into the identity data so the model keeps
its general behaviour. Without a hub, the next best anchor is the base model's own answers to a built-in pool
of general instructions: training on them pulls the tuned model towards the base everywhere but identity.
The answers are *sampled* (temperature 1), not greedy: cross-entropy on samples of the base's own distribution is,
in expectation, KL(base || tuned) plus a constant, so it pulls the tuned distribution towards the base's; greedy
answers would instead teach it to be surer than the base was (measured on the demo: retention KL unchanged with
greedy answers while the share of retained answers rose).
Rows are cached in the run folder (general_distill.jsonl), so a resumed run trains on the same data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunesmith.data.sources import sample_indices
from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import LoadedModel
from tunesmith.progress import Progress

ANSWER_TOKENS = 128
BATCH = 16


def general_distill(lm: LoadedModel, spec: str, run_dir: Path, seed: int, system: str | None,
                    quiet: bool = False) -> list[list[dict]]:
    from tunesmith.data.self_cognition import general_distill_instructions

    pool = general_distill_instructions()
    _, _, count = spec.partition("#")
    if count and not count.isdigit():
        raise UserError(f"--dataset {spec}: the part after '#' must be a number of rows, e.g. general-distill#200.")
    n = int(count) if count else len(pool)
    cache = run_dir / "general_distill.jsonl"
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(rows) == n:
            return [_conv(r) for r in rows]
    instructions = [pool[i] for i in sample_indices(len(pool), n, random.Random(seed))]  # ms-swift's #N
    unique = sorted(set(instructions))
    gen = Generator(lm)
    cfg = SamplingConfig(max_new_tokens=ANSWER_TOKENS, temperature=1.0, seed=seed)
    ids = [gen.chat_prompt([{"role": "user", "content": q}], system) for q in unique]
    bar = Progress("Distill", len(unique), quiet)
    answers = {q: c.text.strip() for q, c in zip(unique, bar.track(gen.complete_many(ids, cfg, rows=BATCH),
                                                                    "general answers of the base model"))}
    rows = [{"query": q, "response": answers[q]} for q in instructions if answers[q]]
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(cache)
    return [_conv(r) for r in rows]


def _conv(r: dict) -> list[dict]:
    return [{"role": "user", "content": r["query"]}, {"role": "assistant", "content": r["response"]}]
