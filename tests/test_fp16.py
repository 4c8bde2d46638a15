"""float16 training with dynamic loss scaling (train/precision.py), on the CPU: the tiny Qwen loaded in float16
runs the same Trainer code path a T4 or V100 runs (LoRA A/B in float32, activations in float16)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunesmith.args import SftArgs
from tunesmith.data.packing import encode_dataset
from tunesmith.errors import UserError
from tunesmith.model.load import load_model
from tunesmith.train.checkpoint import load_trainer_state
from tunesmith.train.loop import Trainer, resolve_defaults
from tunesmith.train.precision import LossScaler, training_dtype


def convs(n: int = 8) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
             {"role": "assistant", "content": f"The answer is {2 * i}." + " More." * (i % 4)}] for i in range(n)]


def fp16_trainer(qwen_dir: Path, run_dir: Path, scaler: LossScaler | None = None, seed: int = 0, **kw) -> Trainer:
    torch.manual_seed(seed)
    lm = load_model(qwen_dir, "float16", "cpu")  # forced: cpu_compute_dtype (run_sft's) is not asked
    base = {"model": str(qwen_dir), "dataset": ["unused"], "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 2, "lora_dropout": 0.0, "learning_rate": 1e-2, "max_steps": 6,
            "save_steps": 100, "logging_steps": 1}
    args = resolve_defaults(SftArgs(**(base | kw)))
    samples, _ = encode_dataset(convs(), lm.template, None, args.max_length)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(args, lm, samples, [], run_dir, torch.device("cpu"), quiet=True, loss_scaler=scaler)


def lora_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def inf_into_one_gradient(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g.view(-1)[0] = math.inf
    return g


def overflow_in_step(trainer: Trainer, n: int) -> None:
    """Make 1-based step n's gradients hold an inf (one element of the first LoRA matrix's)."""
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    train_step = trainer.train_step

    def step():
        if trainer.step != n - 1:
            return train_step()
        hook = param.register_hook(inf_into_one_gradient)
        try:
            return train_step()
        finally:
            hook.remove()

    trainer.train_step = step


def records(run_dir: Path) -> list[dict]:
    """logging.jsonl's lines (strict JSON), each with its step."""
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in logging.jsonl"))
            for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    return [{"step": int(r["global_step/max_steps"].split("/")[0]), **r} for r in rows]


def test_a_step_with_inf_gradients_is_skipped_and_the_scale_halves(qwen_tiny_dir, tmp_path):
    trainer = fp16_trainer(qwen_tiny_dir, tmp_path / "run")
    assert trainer.scaler is not None and trainer.scaler.scale == 2.0**16  # float16 compute: scaling is on
    assert all(p.dtype == torch.float32 for p in lora_state(trainer).values())  # LoRA's master weights stay fp32
    before = lora_state(trainer)
    overflow_in_step(trainer, 1)
    out = trainer.train_step()
    assert out["skipped"] and not math.isfinite(out["grad_norm"])
    assert math.isfinite(out["loss"])
    assert trainer.step == 1  # the step counter advances
    assert trainer.scaler.scale == 2.0**15
    after = lora_state(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changed parameters"
    assert not trainer.optimizer.state  # AdamW took no step (no moments, no step count)
    assert all(p.grad is None for p in trainer.model.parameters())

    out = trainer.train_step()  # the next good step trains
    assert not out["skipped"] and math.isfinite(out["grad_norm"]) and math.isfinite(out["loss"])
    assert trainer.scaler.scale == 2.0**15
    assert any(not torch.equal(after[n], p) for n, p in lora_state(trainer).items())

    # Through fit: the skipped step gets its own log line, which says so; the logged loss stays finite.
    trainer = fp16_trainer(qwen_tiny_dir, tmp_path / "fit", max_steps=3, logging_steps=5)
    overflow_in_step(trainer, 2)
    trainer.fit()
    logged = {r["step"]: r for r in records(tmp_path / "fit") if "loss" in r}
    assert sorted(logged) == [1, 2, 3]  # 1 (the first), 2 (skipped), 3 (the last)
    assert "optimizer step skipped" in logged[2]["skipped"] and logged[2]["grad_norm"] is None
    assert all(math.isfinite(r["loss"]) for r in logged.values())
    assert [logged[s]["loss_scale"] for s in (1, 2, 3)] == [2.0**16, 2.0**15, 2.0**15]
    assert "skipped" not in logged[1] and "skipped" not in logged[3]


def test_float16_overflow_of_a_too_large_scale_backs_off_until_steps_succeed(qwen_tiny_dir, tmp_path):
    """No injection: at 2**40 the scaled loss gradient overflows float16 in backward, as on a GPU."""
    trainer = fp16_trainer(qwen_tiny_dir, tmp_path, scaler=LossScaler(init_scale=2.0**40), max_steps=40)
    before = lora_state(trainer)
    skipped = 0
    while trainer.train_step()["skipped"]:
        skipped += 1
        assert skipped < 30
    assert skipped >= 1 and trainer.scaler.scale == 2.0 ** (40 - skipped)
    assert any(not torch.equal(before[n], p) for n, p in lora_state(trainer).items())


def test_scale_doubles_after_growth_interval_good_steps(qwen_tiny_dir, tmp_path):
    # from 2**8: far below this tiny model's overflow (its float16 backward overflows at 2**17 here), so no skips
    trainer = fp16_trainer(qwen_tiny_dir, tmp_path, scaler=LossScaler(init_scale=2.0**8, growth_interval=3))
    outs = [trainer.train_step() for _ in range(6)]
    assert not any(o["skipped"] for o in outs)
    assert [o["loss_scale"] for o in outs] == [2.0**8, 2.0**8, 2.0**9, 2.0**9, 2.0**9, 2.0**10]
    s = LossScaler(init_scale=8.0, growth_interval=2)  # a skip restarts the count of good steps
    for found_inf in (False, True, False, False):
        s.update(found_inf)
    assert (s.scale, s.good_steps) == (8.0, 0)


def test_resume_restores_the_scale_and_gives_the_same_losses(qwen_tiny_dir, tmp_path):
    # growth every 2 steps from 2**8 (no natural overflow) and an inf in step 5: at checkpoint-3 the scale is 2**9
    # with one good step counted, so step 4 doubles it and step 5 halves it again
    def scaler():
        return LossScaler(init_scale=2.0**8, growth_interval=2)

    straight = fp16_trainer(qwen_tiny_dir, tmp_path / "straight", scaler=scaler(), save_steps=3)
    overflow_in_step(straight, 5)
    straight.fit()
    want = {r["step"]: r for r in records(tmp_path / "straight") if "loss" in r}
    assert [want[s]["loss_scale"] for s in range(1, 7)] == [2.0**8, 2.0**9, 2.0**9, 2.0**10, 2.0**9, 2.0**9]
    assert [s for s in want if "skipped" in want[s]] == [5]
    assert load_trainer_state(tmp_path / "straight" / "checkpoint-3")["loss_scaler"] == {"scale": 2.0**9,
                                                                                       "good_steps": 1}

    resumed = fp16_trainer(qwen_tiny_dir, tmp_path / "resumed", scaler=scaler(), seed=123, save_steps=3)
    overflow_in_step(resumed, 5)
    resumed.resume(tmp_path / "straight" / "checkpoint-3")
    assert (resumed.step, resumed.scaler.scale, resumed.scaler.good_steps) == (3, 2.0**9, 1)
    resumed.fit()
    got = {r["step"]: r for r in records(tmp_path / "resumed") if "loss" in r}
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):  # the same float16 ops in the same order
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step
        assert got[step]["loss_scale"] == want[step]["loss_scale"], step
    assert resumed.losses == pytest.approx(straight.losses[3:], abs=1e-6)
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for n, p in lora_state(resumed).items():
        torch.testing.assert_close(p, lora_state(straight)[n], rtol=0, atol=1e-6)


def test_full_fine_tuning_in_float16_is_refused_in_one_sentence(qwen_tiny_dir, tmp_path):
    with pytest.raises(UserError, match="master weights"):
        fp16_trainer(qwen_tiny_dir, tmp_path, train_type="full")


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("asked, saved, capability, train_type, dtype, note", [
    (BF16, None, (7, 5), "lora", FP16, "compute capability 7.5) has no bfloat16, so training computes in float16"),
    (None, BF16, (7, 0), "lora", FP16, "compute capability 7.0) has no bfloat16"),  # the checkpoint's bf16 default
    (BF16, None, (7, 5), "full", FP32, "computes in float32"),  # fp16 would lose full fine-tuning's updates
    (None, FP16, (7, 5), "full", FP32, "checkpoint is float16"),
    (None, FP16, (9, 0), "full", BF16, "checkpoint is float16"),
    (BF16, None, (8, 0), "lora", BF16, None),  # Ampere and newer: as asked
    (None, BF16, (9, 0), "lora", None, None),  # the checkpoint's dtype, left to load_model
    (FP16, None, (7, 5), "lora", FP16, None),  # float16 asked: loss scaling, no note
    (BF16, None, None, "lora", BF16, None),  # not CUDA: model/load.cpu_compute_dtype decides
    (FP32, BF16, (6, 1), "full", FP32, None),
])
def test_bf16_falls_back_by_device_capability(asked, saved, capability, train_type, dtype, note):
    got, said = training_dtype(asked, saved, capability, train_type)
    assert got == dtype
    if note is None:
        assert said is None
    else:
        assert note in said and said.startswith("note: ") and "\n" not in said


def test_explicit_float16_full_fine_tuning_is_refused_on_any_device():
    for capability in ((7, 5), (9, 0), None):
        with pytest.raises(UserError, match="--train_type full with --torch_dtype float16 is refused"):
            training_dtype(FP16, None, capability, "full")
