"""The data check `sft` prints before training (and alone with --dry_run true): what the run will learn from.

Per source: conversations. Over the training set: tokens per conversation (min / median / max, through the
model's chat template), conversations over --max_length (dropped or cut, as --truncation_strategy says),
duplicates, empty turns, unfilled {{NAME}} / {{AUTHOR}} placeholders, supervised tokens (the answer tokens the
loss is taken on), optimizer steps and the summed learning rate of the schedule. One warning when the data
teaches an identity and the schedule is too short to move it (IDENTITY_LR_SUM, measured on the bundled model).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

from tunesmith.data.packing import Sample, fit_sample, with_system
from tunesmith.data.self_cognition import PLACEHOLDERS
from tunesmith.text.template import ChatTemplate

# `python bench/identity_recipes.py --part schedule` (bench/results-identity-schedule-cpu.jsonl: bundled
# SmolLM2-135M-Instruct, LoRA r8 all-linear, built-in self-cognition set, 8 samples a step, constant learning
# rates 1e-4 / 3e-4 / 1e-3, a check every 5 steps): held-out identity questions adopted stay at 0-5% while the
# learning rate summed over the steps is at most 0.005 (1e-4 x 40 steps, 3e-4 x 15, 1e-3 x 5), reach 95% en /
# 60% zh at 0.006 and 95-100% in both from 0.0075 on (3e-4 x 25, 1e-3 x 10). The step count alone does not
# decide it: 40 steps at 1e-4 adopt nothing, 10 at 1e-3 everything.
IDENTITY_LR_SUM = 0.0075


@dataclass
class Schedule:
    """The optimizer schedule the run will follow (train/loop.py computes it)."""

    steps: int
    samples_per_step: int
    epochs: float
    lr_sum: float  # the learning rate summed over all steps (warm-up and decay included)


@dataclass
class DataCheck:
    sources: dict[str, int]  # spec -> conversations (general-distill#N: N, made by the base model at the start)
    conversations: int
    eval_conversations: int
    tokens_min: int
    tokens_median: int
    tokens_max: int
    max_length: int
    over_max_length: int
    truncation: str
    duplicates: int
    empty_turns: int
    placeholders: int
    no_answer: int
    supervised_tokens: int
    steps: int
    samples_per_step: int
    epochs: float
    lr_sum: float
    teaches_identity: bool
    pending: int = 0  # conversations not made yet (general-distill answers in a dry run): not in the token counts
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        src = ", ".join(f"{k} {v:,}" for k, v in self.sources.items())
        over = {"delete": "dropped", "left": "cut from the left", "right": "cut from the right"}[self.truncation]
        out = [f"data check: {src}",
               f"  {self.conversations:,} training conversations, {self.eval_conversations:,} for evaluation; tokens per "
               f"conversation min {self.tokens_min:,} / median {self.tokens_median:,} / max {self.tokens_max:,}"
               + (f" (not counting the {self.pending:,} general-distill answers, made when the run starts)" if self.pending else ""),
               f"  over --max_length {self.max_length:,}: {self.over_max_length:,} ({over}); duplicates {self.duplicates:,}; "
               f"empty turns {self.empty_turns:,}; unfilled placeholders {self.placeholders:,}; no answer {self.no_answer:,}",
               f"  supervised tokens {self.supervised_tokens:,}; {self.steps:,} optimizer steps of {self.samples_per_step} "
               f"samples ({self.epochs:g} epochs); learning rate summed over the steps {self.lr_sum:.4g}"]
        return out + [f"warning: {w}" for w in self.warnings]


def teaches_identity(specs: list[str], convs: list[list[dict]], terms: list[str]) -> bool:
    """The built-in self-cognition set is in the data, or some answer names --model_name / --model_author."""
    if any(s.split("#")[0] == "self-cognition" for s in specs):
        return True
    terms = [t.lower() for t in terms if t]
    return bool(terms) and any(m["role"] == "assistant" and any(t in str(m.get("content") or "").lower() for t in terms)
                               for c in convs for m in c)


def check_data(template: ChatTemplate, system: str | None, max_length: int, truncation: str,
               sources: dict[str, int], train: list[list[dict]], n_eval: int,
               schedule_for: Callable[[int], Schedule], identity: bool, pending: int = 0
               ) -> tuple[DataCheck, list[Sample | None]]:
    """The check of the training conversations `train`, and their samples (None where one is dropped), encoded
    once for both. schedule_for(n) is the schedule of n samples; `pending` conversations are not made yet."""
    lengths, samples, supervised, over, no_answer, empty, placeholders = [], [], 0, 0, 0, 0, 0
    seen, duplicates = set(), 0
    for conv in train:
        key = json.dumps(conv, ensure_ascii=False, sort_keys=True)
        duplicates += key in seen
        seen.add(key)
        empty += sum(1 for m in conv if not str(m.get("content") or "").strip())
        placeholders += any(p in str(m.get("content") or "") for m in conv for p in PLACEHOLDERS)
        enc = template.encode(with_system(conv, system))
        lengths.append(len(enc.input_ids))
        over += len(enc.input_ids) > max_length
        sample = fit_sample(enc.input_ids, enc.labels_mask, max_length, truncation)
        samples.append(sample)
        if sample is None:
            no_answer += len(enc.input_ids) <= max_length
        else:
            supervised += sample.n_supervised
    schedule = schedule_for(sum(s is not None for s in samples) + pending)
    lengths = lengths or [0]
    check = DataCheck(sources=dict(sources), conversations=len(train) + pending, eval_conversations=n_eval,
                      tokens_min=min(lengths), tokens_median=int(statistics.median(lengths)), tokens_max=max(lengths),
                      max_length=max_length, over_max_length=over, truncation=truncation, duplicates=duplicates,
                      empty_turns=empty, placeholders=placeholders, no_answer=no_answer, supervised_tokens=supervised,
                      steps=schedule.steps, samples_per_step=schedule.samples_per_step, epochs=schedule.epochs,
                      lr_sum=schedule.lr_sum, teaches_identity=identity, pending=pending)
    if identity and schedule.lr_sum < IDENTITY_LR_SUM:
        check.warnings.append(
            f"{schedule.steps} steps sum the learning rate to {schedule.lr_sum:.2g}, below the {IDENTITY_LR_SUM:g} that "
            f"the bundled 135M model needed before it named its new identity in 90% of held-out questions; raise "
            f"--num_train_epochs or --learning_rate (a rule measured on that model: the check after training tells "
            f"for yours).")
    if over and truncation == "delete":
        check.warnings.append(f"{over} conversation{'s are' if over > 1 else ' is'} longer than --max_length "
                              f"{max_length} and will be dropped; raise --max_length to keep them.")
    if placeholders:
        check.warnings.append(f"{placeholders} conversation{'s' if placeholders > 1 else ''} still hold {{{{NAME}}}} or "
                              f"{{{{AUTHOR}}}}; pass --model_name and --model_author to fill them.")
    return check, samples
