"""What `sft` says before and after a run: the data check (--dry_run prints it and writes nothing), and the
identity check after a run whose data teaches an identity (none after one that does not), with its advice when
the run was too short."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.args import SftArgs
from tunesmith.commands.sft import run_sft
from tunesmith.data.check import IDENTITY_LR_SUM, Schedule, check_data, teaches_identity
from tunesmith.model.load import load_template
from tunesmith.train.loop import resolve_defaults, schedule

SYSTEM = "You are a helpful assistant."


def conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def template():
    return load_template("smollm2-135m-instruct")


def test_data_check_counts_a_crafted_dataset(template):
    long = conv("Tell me everything. " * 40, "Everything. " * 40)  # ~400 tokens
    rows = [conv("Who are you?", "I am Smithy."), conv("Who are you?", "I am Smithy."),  # a duplicate
            conv("Hi", ""),  # an empty answer: an empty turn (it still teaches the end-of-turn token)
            [{"role": "user", "content": "Anyone there?"}],  # no answer: nothing to learn
            conv("Name?", "I am {{NAME}}."),  # an unfilled placeholder
            long, long,  # two over --max_length (one of them also a duplicate)
            conv("What is 2+2?", "4")]
    check, samples = check_data(template, SYSTEM, 128, "delete", {"mine.jsonl": len(rows)}, rows, 3,
                                lambda n: Schedule(steps=n, samples_per_step=1, epochs=1.0, lr_sum=n * 1e-4),
                                identity=True)
    assert (check.conversations, check.eval_conversations) == (8, 3)
    assert (check.duplicates, check.empty_turns, check.placeholders) == (2, 1, 1)
    assert (check.over_max_length, check.no_answer) == (2, 1)
    kept = [s for s in samples if s is not None]
    assert len(kept) == 5 and check.steps == 5  # the schedule is of the samples that train
    assert check.supervised_tokens == sum(s.n_supervised for s in kept)
    by_len = sorted(len(template.encode([{"role": "system", "content": SYSTEM}] + r).input_ids) for r in rows)
    assert (check.tokens_min, check.tokens_median, check.tokens_max) == (by_len[0], (by_len[3] + by_len[4]) // 2,
                                                                       by_len[-1])
    text = "\n".join(check.lines())
    assert "mine.jsonl 8" in text and "over --max_length 128: 2 (dropped)" in text
    # three warnings: too little training for an identity, rows that will be dropped, unfilled placeholders
    assert len(check.warnings) == 3
    assert f"below the {IDENTITY_LR_SUM:g}" in check.warnings[0] and "--num_train_epochs" in check.warnings[0]
    assert "2 conversations are longer than --max_length 128" in check.warnings[1]
    assert "--model_name" in check.warnings[2]


def test_identity_warning_follows_the_summed_learning_rate(template):
    rows = [conv("Who are you?", "I am Smithy.")]
    plenty = Schedule(steps=30, samples_per_step=8, epochs=2.0, lr_sum=IDENTITY_LR_SUM * 1.5)
    check, _ = check_data(template, SYSTEM, 2048, "delete", {"x": 1}, rows, 0, lambda n: plenty, identity=True)
    assert check.warnings == []
    short = Schedule(steps=5, samples_per_step=16, epochs=10.0, lr_sum=IDENTITY_LR_SUM / 10)
    check, _ = check_data(template, SYSTEM, 2048, "delete", {"x": 1}, rows, 0, lambda n: short, identity=False)
    assert check.warnings == []  # no identity taught: nothing to warn about


def test_teaches_identity():
    assert teaches_identity(["self-cognition#20"], [], [])
    assert teaches_identity(["mine.jsonl"], [conv("Who?", "I'm Smithy, made by Acme.")], ["Smithy", "Acme"])
    assert not teaches_identity(["mine.jsonl"], [conv("2+2?", "4")], ["Smithy"])
    assert not teaches_identity(["mine.jsonl"], [conv("Who?", "I'm Smithy.")], [])


def test_schedule_sums_the_learning_rate_of_the_planned_steps():
    args = resolve_defaults(SftArgs(learning_rate=1e-3, num_train_epochs=2, per_device_train_batch_size=1,
                                    gradient_accumulation_steps=8, lr_scheduler_type="constant"))
    s = schedule(args, 120)
    assert (s.steps, s.samples_per_step, s.epochs) == (30, 8, 2.0)
    assert s.lr_sum == pytest.approx(30 * 1e-3)
    cosine = schedule(resolve_defaults(SftArgs(learning_rate=1e-3, num_train_epochs=2, gradient_accumulation_steps=8)), 120)
    assert cosine.lr_sum == pytest.approx(15 * 1e-3, rel=0.05)  # the cosine's mean is half its peak


def test_dry_run_prints_the_check_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "response": "I am Smithy."}) + "\n" for i in range(20)))
    out = tmp_path / "output"
    args = SftArgs(model="smollm2-135m-instruct", dataset=[str(data), "general-distill#12"], model_name=["Smithy"],
                   learning_rate=1e-4, num_train_epochs=1, output_dir=str(out), dry_run=True)
    assert run_sft(args) is None
    printed = capsys.readouterr().out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl"]
    assert f"{data} 20, general-distill#12 12" in printed
    assert "32 training conversations" in printed and "not counting the 12 general-distill answers" in printed
    assert "2 optimizer steps of 16 samples" in printed
    assert "warning:" in printed and "--num_train_epochs" in printed  # the answers name --model_name: an identity


@pytest.mark.slow  # two short training runs on the bundled model, one followed by the identity check (~70 s)
def test_identity_check_runs_after_an_identity_run_only_and_advises_a_short_one(tmp_path, capsys):
    common = dict(model="smollm2-135m-instruct", learning_rate=1e-4, max_steps=2, gradient_accumulation_steps=2,
                  system=SYSTEM, save_steps=1000)
    trainer = run_sft(SftArgs(**common, dataset=["self-cognition#8"], model_name=["Smithy"],
                              model_author=["Tunesmith Labs"], output_dir=str(tmp_path / "identity")))
    printed = capsys.readouterr()
    err = printed.err
    report = json.loads((trainer.last_checkpoint / "eval" / "eval.json").read_text())
    assert report["identity"]["by_lang"]["all"]["tuned"]["adopted"] < 0.5  # two steps at 1e-4 move nothing
    assert "data check: self-cognition#8 8" in err and "warning:" in err  # said before the run ...
    advice = [line for line in err.splitlines() if line.startswith("advice: the identity did not stick")]
    assert len(advice) == 1 and "--max_steps" in advice[0], err[-2000:]  # ... and after it
    assert "adopted ( en" in printed.out and "identity in general answers" in printed.out

    data = tmp_path / "general.jsonl"
    data.write_text("".join(json.dumps({"query": f"What is {i}+{i}?", "response": str(2 * i)}) + "\n" for i in range(8)))
    trainer = run_sft(SftArgs(**common, dataset=[str(data)], output_dir=str(tmp_path / "plain")))
    printed = capsys.readouterr()
    err = printed.err
    assert "adopted" not in printed.out
    assert not (trainer.last_checkpoint / "eval").exists() and "advice:" not in err and "adopted" not in err
