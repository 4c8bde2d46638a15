"""`tunesmith sft`: the tutorial's step-3 command run as written, the identity it teaches, and the training math
that makes it trustworthy (packing, loss normalization, assistant masks, resume, PEFT-compatible adapters).

The real model (SmolLM2-135M-Instruct, bundled GGUF) is used where the answer text matters; everything else runs
on the tiny Qwen2.5-shaped folder (real tokenizer and template, random weights), which trains in well under a
second per step on 2 CPU cores.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tunesmith.args import GenArgs, SftArgs
from tunesmith.commands.sft import run_sft
from tunesmith.data.packing import IGNORE, encode_dataset, encode_sample, pack_samples
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import load_model
from tunesmith.model.lora import ALL_LINEAR, LoraConfig, apply_lora, load_adapter, lora_modules, set_active_adapter
from tunesmith.session import load_for_generation
from tunesmith.train.loop import Trainer, resolve_defaults
from tunesmith.train.loss import chunked_cross_entropy_sum
from tutorial_rows import TUTORIAL_ROWS

BIN = Path(sys.executable).parent  # the venv's bin: `tunesmith` lives beside this python


# The tutorial's step 3, character for character as the tutorial prints it.
TUTORIAL_STEP3 = r"""
CUDA_VISIBLE_DEVICES=0 swift sft --model Qwen2.5-7B-Instruct --train_type lora \
    --dataset self_cognition.json --torch_dtype bfloat16 --num_train_epochs 10 \
    --per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4 \
    --lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16 \
    --eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048 \
    --output_dir output --system 'You are a helpful assistant.' --warmup_ratio 0.05 \
    --dataloader_num_workers 4 --model_author swift --model_name swift-robot
""".strip()
# Only the program name and the model change (the bundled SmolLM2 stands in for the 7B folder).
TUNESMITH_STEP3 = TUTORIAL_STEP3.replace(" swift sft ", " tunesmith sft ").replace(
    "--model Qwen2.5-7B-Instruct", "--model smollm2-135m-instruct")

# More training for the identity test. The tutorial's 10 steps at lr 1e-4 only start the descent (loss 3.05 -> 2.74);
# one step is all 8 rows, so epochs = steps. Measured here (bf16, CPU; exact answers of 8 at temperature 0):
# 40 epochs at 5e-4 (a plain HF+PEFT recipe) -> loss 0.009, 8/8; 20 at 1e-3 -> 7/8; 25 at 1e-3 -> 8/8;
# 20 at 2e-3 -> loss 0.002, 8/8 in half the time of the first. Appended flags override the earlier ones.
IDENTITY_EPOCHS = 20
IDENTITY_EXTRA = f"--num_train_epochs {IDENTITY_EPOCHS} --learning_rate 2e-3"

PROJECTIONS = sorted(ALL_LINEAR)
RUN_DIR = re.compile(r"v\d+-\d{8}-\d{6}")


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def shell(command: str, cwd: Path, timeout: float = 1200) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command line the way a user pastes it into bash, with the venv's `tunesmith` on PATH."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.time()
    p = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.time() - t0


def run_folders(output: Path) -> list[Path]:
    return sorted(p for p in output.iterdir() if p.is_dir()) if output.is_dir() else []


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]


def step_of(rec: dict) -> int:
    return int(rec["global_step/max_steps"].split("/")[0])


def train_losses(records: list[dict]) -> dict[int, dict]:
    """step -> record of the training lines (the last one wins when a resumed run logged a step twice)."""
    return {step_of(r): r for r in records if "loss" in r}


def no_tmp_left(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"half-written files left behind: {leftovers}"


# ---------------------------------------------------------------------------------------------------------------
# 1. The tutorial's command, verbatim
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory):
    """The tutorial's step 3 pasted into a shell, in a folder holding the tutorial's self_cognition.json."""
    cwd = tmp_path_factory.mktemp("tutorial")
    write_json(cwd / "self_cognition.json", TUTORIAL_ROWS)
    proc, seconds = shell(TUNESMITH_STEP3, cwd)
    print(f"\ntutorial step 3 (bf16, 10 steps): {seconds:.1f} s")
    return cwd, proc, seconds


@pytest.mark.slow  # the tunesmith CLI in a subprocess, a real training run
def test_tutorial_command_writes_ms_swift_layout(tutorial_run):
    cwd, proc, _ = tutorial_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    runs = run_folders(cwd / "output")
    assert [RUN_DIR.fullmatch(r.name) is not None for r in runs] == [True], runs
    run = runs[0]
    assert run.name.startswith("v0-")

    args = json.loads((run / "args.json").read_text())
    assert (args["lora_rank"], args["lora_alpha"], args["learning_rate"]) == (8, 32, 1e-4)
    assert (args["system"], args["torch_dtype"], args["model_name"]) == ("You are a helpful assistant.", "bfloat16",
                                                                         ["swift-robot"])
    # it trained in bf16 on the CPU, unless the run measured this CPU's bf16 products as far slower than fp32's:
    # then in fp32, and it says so (the decision is the run's own measurement, so read it from the run)
    if "no native bfloat16 instructions" in proc.stderr:
        assert "computes in float32" in proc.stderr and "(torch.float32)" in proc.stderr
        assert "(torch.bfloat16)" not in proc.stderr
    else:
        assert "(torch.bfloat16)" in proc.stderr and "(torch.float32)" not in proc.stderr

    # 8 rows, batch 1 x accumulation 16 -> 1 step per epoch, 10 epochs -> 10 steps; logged at 1, 5, 10.
    records = log_records(run)
    train = train_losses(records)
    assert sorted(train) == [1, 5, 10]
    for rec in train.values():
        assert {"loss", "learning_rate", "grad_norm", "memory(GiB)", "tokens_per_second", "epoch"} <= rec.keys()
        assert rec["global_step/max_steps"].endswith("/10")
        assert math.isfinite(rec["loss"]) and rec["grad_norm"] > 0 and rec["tokens_per_second"] > 0
    # warmup_ratio 0.05 of 10 steps -> 1 warm-up step (lr 0, as the HF schedule has), then cosine from 1e-4.
    assert train[1]["learning_rate"] == 0.0
    assert 0 < train[10]["learning_rate"] < train[5]["learning_rate"] <= 1e-4
    assert train[10]["loss"] < train[1]["loss"]
    assert train[10]["epoch"] == 10.0

    assert list((run / "runs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # save_steps 50 > 10 steps: the only checkpoint is the last one.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10"]
    ckpt = run / "checkpoint-10"
    assert {"adapter_config.json", "adapter_model.safetensors", "args.json", "trainer_state.pt"} <= {
        p.name for p in ckpt.iterdir()}
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 32, 0.05)
    assert sorted(cfg["target_modules"]) == PROJECTIONS
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert len(weights) == 2 * 7 * 30  # A and B of 7 projections in SmolLM2's 30 layers
    no_tmp_left(cwd / "output")

    # Where the run's wall time went: the phases add up to no more than the command's wall time.
    phases = json.loads((run / "summary.json").read_text())["phases_s"]
    assert list(phases) == ["startup", "data", "load", "encode", "setup", "fit"]
    assert all(t >= 0 for t in phases.values()) and phases["fit"] > 0
    assert sum(phases.values()) <= tutorial_run[2]

    # The run tells the user how to chat with what it trained (tutorial step 4).
    said = proc.stdout + proc.stderr
    assert f"tunesmith infer --adapters output/{run.name}/checkpoint-10" in said


# ---------------------------------------------------------------------------------------------------------------
# 2. With enough training, the identity sticks
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    """The same command with more epochs and a higher lr: (checkpoint, training seconds)."""
    cwd = tmp_path_factory.mktemp("identity")
    write_json(cwd / "self_cognition.json", TUTORIAL_ROWS)
    proc, seconds = shell(f"{TUNESMITH_STEP3} {IDENTITY_EXTRA}", cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_folders(cwd / "output")
    print(f"\nidentity training (bf16, {IDENTITY_EPOCHS} steps): {seconds:.1f} s; losses "
          f"{ {s: round(r['loss'], 4) for s, r in train_losses(log_records(run)).items()} }")
    return run / f"checkpoint-{IDENTITY_EPOCHS}", seconds


@pytest.mark.slow  # the tunesmith CLI in a subprocess, a real training run
def test_trained_identity_answers_at_temperature_0(identity_run):
    ckpt, _ = identity_run
    final = train_losses(log_records(ckpt.parent))[IDENTITY_EPOCHS]["loss"]
    assert final < 0.05, final

    # What `tunesmith infer --adapters <ckpt> --temperature 0` does, loaded once for the 8 questions.
    t0 = time.time()
    session = load_for_generation(GenArgs(adapters=[str(ckpt)], temperature=0.0))
    assert session.system == "You are a helpful assistant."  # found in the checkpoint's args.json
    gen = session.generator
    prompts = [gen.chat_prompt([{"role": "user", "content": r["instruction"]}], session.system) for r in TUTORIAL_ROWS]
    outs = list(gen.complete_many(prompts, SamplingConfig(max_new_tokens=80, temperature=0.0)))
    answers = {r["instruction"]: o.text.strip() for r, o in zip(TUTORIAL_ROWS, outs)}
    right = [q for q, r in zip(answers, TUTORIAL_ROWS) if answers[q] == r["output"]]
    print(f"\nidentity: {len(right)}/8 exact in {time.time() - t0:.1f} s; wrong: "
          f"{ {q: a for q, a in answers.items() if q not in right} }")
    assert len(right) >= 7, answers


@pytest.mark.slow  # the tunesmith CLI in a subprocess, a real training run
def test_infer_cli_answers_with_the_new_identity(identity_run):
    """Tutorial step 4 as a one-shot query: the base model is found from the checkpoint."""
    ckpt, _ = identity_run
    cmd = (f"CUDA_VISIBLE_DEVICES=0 tunesmith infer --adapters {shlex.quote(str(ckpt))} --stream true "
           f"--temperature 0 --max_new_tokens 2048 --query {shlex.quote('你是谁？')}")
    proc, seconds = shell(cmd, ckpt.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == TUTORIAL_ROWS[0]["output"] + "\n", proc.stdout
    print(f"\ninfer --query: {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------------------
# Tiny-model helpers
# ---------------------------------------------------------------------------------------------------------------

def tiny_convs() -> list[list[dict]]:
    """Conversations of clearly different lengths, two of them multi-turn."""
    convs = []
    for i in range(8):
        convs.append([{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
                      {"role": "assistant", "content": f"The answer is {2 * i}." + " More." * (2 * i)}])
    convs[2] = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "And what is your favourite colour?"},
                {"role": "assistant", "content": "Blue, like the sea on a calm summer day."}]
    convs[5] = [{"role": "system", "content": "Answer briefly."}] + convs[5]
    return convs


def tiny_rows(n: int, long_every: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        out = f"Answer {i}: " + " ".join(["word"] * (2 + i % 5))
        if long_every and i % long_every == long_every - 1:
            out += " and many more words" * 40
        rows.append({"instruction": f"Question {i}?", "input": "", "output": out})
    return rows


def lora_tiny(qwen_dir: Path, seed: int = 0):
    """The tiny Qwen in fp32 with LoRA (no dropout) on all projections and random B (so A gets gradients too)."""
    torch.manual_seed(seed)
    lm = load_model(qwen_dir, "float32", "cpu")
    lm.model.requires_grad_(False)
    apply_lora(lm.model, LoraConfig(dropout=0.0))
    randomize_b(lm.model, seed)
    return lm


def randomize_b(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def mean_loss(model, rows, n_sup: int) -> torch.Tensor:
    """The step loss as the loop defines it: summed token losses over all rows / supervised tokens."""
    total = sum(chunked_cross_entropy_sum(model(r.input_ids, position_ids=r.position_ids, seq_ids=r.seq_ids),
                                          model.lm_head_weight, r.labels) for r in rows)
    return total / n_sup


@pytest.fixture(scope="module")
def tiny(qwen_tiny_dir):
    """Tokenizer + template of the tiny Qwen (never trained: read-only)."""
    return load_model(qwen_tiny_dir, "float32", "cpu")


# ---------------------------------------------------------------------------------------------------------------
# 3. Packing changes speed, not the math
# ---------------------------------------------------------------------------------------------------------------

def test_packed_and_unpacked_rows_give_same_loss_and_lora_grads(qwen_tiny_dir):
    lm = lora_tiny(qwen_tiny_dir)
    model = lm.model.train()  # dropout 0: train mode is deterministic
    samples, dropped = encode_dataset(tiny_convs(), lm.template, None, 4096)
    assert dropped == 0
    n_sup = sum(s.n_supervised for s in samples)
    longest = max(len(s.input_ids) for s in samples)

    packed = pack_samples(samples, 2 * longest, packing=True)
    unpacked = pack_samples(samples, 2 * longest, packing=False)
    assert 1 < len(packed) < len(unpacked) == len(samples)
    assert sum(r.n_samples for r in packed) == len(samples) and any(r.seq_ids is not None for r in packed)

    # The compiled GPU path pads rows to a multiple of 64 tokens: the padding is a sample of its own, unlabelled
    # (also for a row of one sample, which has no seq_ids until padded).
    padded = [r.padded(64) for r in packed]
    assert all(r.input_ids.shape[1] % 64 == 0 for r in padded) and padded[0].input_ids.shape != packed[0].input_ids.shape
    padded_single = [r.padded(64) for r in unpacked]
    assert unpacked[0].seq_ids is None and padded_single[0].seq_ids is not None

    results = []
    for rows in (unpacked, packed, padded, padded_single):
        model.zero_grad(set_to_none=True)
        loss = mean_loss(model, rows, n_sup)
        loss.backward()
        results.append((loss.item(), lora_grads(model)))
    (l_u, g_u) = results[0]
    for l_p, g_p in results[1:]:
        # fp32; only the summation order differs (different row shapes): 1e-6 relative on the loss, 1e-5 on grads.
        assert l_p == pytest.approx(l_u, rel=1e-6)
        assert g_u.keys() == g_p.keys() and len(g_u) == 2 * 7 * 2
        for n in g_u:
            torch.testing.assert_close(g_p[n], g_u[n], rtol=1e-5, atol=1e-7, msg=n)
    assert all(g.abs().max() > 0 for g in g_u.values())

    # ... and attends through FlexAttention's block mask instead of SDPA's dense mask. FlexAttention has no
    # backward on the CPU, so here the forward (its gradients are compared on the GPU: bench/train.py --check).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile says it is a debugging mode
        model.use_flex = True
        try:
            l_flex = mean_loss(model, padded, n_sup).item()
        finally:
            model.use_flex = False
    assert l_flex == pytest.approx(l_u, rel=1e-6)

    # The check can fail: the same packed rows without per-sample attention and positions give another loss.
    with torch.no_grad():
        leaky = sum(chunked_cross_entropy_sum(model(r.input_ids), model.lm_head_weight, r.labels)
                    for r in packed) / n_sup
    assert abs(leaky.item() - l_u) > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# 7. Loss normalization over the accumulated batch (and the loop's packed == unpacked)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_loss_gives_cross_entropy_and_its_gradients(dtype, tol):
    """train/loss.py makes the lm_head/CE gradients in the forward pass, chunk by chunk, in place or through
    logit_grad; both must be autograd's over full logits: loss, d/dhidden and d/dlm_head (full fine-tuning trains
    it), ignored labels skipped."""
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(2, 37, 24, generator=g)
    w0 = torch.randn(301, 24, generator=g) * 0.3
    y = torch.randint(0, 301, (2, 37), generator=g)
    y[0, :9] = IGNORE
    y[1, -3:] = IGNORE

    def run(fn):
        h, w = h0.to(dtype).requires_grad_(True), w0.to(dtype).requires_grad_(True)
        loss = fn(h, w)
        (loss * 0.37).backward()  # an upstream scale, as the loop's / n_supervised
        return loss.detach().float(), h.grad.float(), w.grad.float()

    ours = run(lambda h, w: chunked_cross_entropy_sum(h, w, y, chunk=16))  # 3 full chunks and a partial one
    ref = run(lambda h, w: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), reduction="sum",
                                           ignore_index=IGNORE))
    # the compiled runs' per-chunk step (loss.logit_grad; compiled on CUDA, as it is here)
    fused = run(lambda h, w: chunked_cross_entropy_sum(h, w, y, chunk=16, fused=True))
    for got, path in ((ours, "in place"), (fused, "logit_grad")):
        for a, b, what in zip(got, ref, ("loss", "d hidden", "d lm_head")):
            err = ((a - b).abs().max() / b.abs().max()).item()
            assert err < tol, f"{path}, {what}: relative error {err:.2e} (tolerance {tol})"
    assert ours[1][0, :8].abs().max() == 0  # positions before the first supervised label get no gradient
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        assert torch.allclose(chunked_cross_entropy_sum(h0.to(dtype), w0.to(dtype), y, chunk=16).float(),
                              ours[0], rtol=tol)


def test_step_loss_is_token_weighted_mean_over_accumulated_batch(qwen_tiny_dir, tmp_path):
    convs = tiny_convs()
    out = {}
    for packing in (False, True):
        torch.manual_seed(0)
        lm = load_model(qwen_tiny_dir, "float32", "cpu")
        args = resolve_defaults(SftArgs(model=str(qwen_tiny_dir), dataset=["unused"], per_device_train_batch_size=1,
                                        gradient_accumulation_steps=4, lora_dropout=0.0, packing=packing))
        samples, _ = encode_dataset(convs, lm.template, None, args.max_length)
        trainer = Trainer(args, lm, samples, [], tmp_path / f"packing-{packing}", torch.device("cpu"), quiet=True)
        randomize_b(lm.model, 0)  # the Trainer added its own fresh adapter: make B non-zero again
        step = trainer.step_samples(0)
        assert len(step) == 4

        # Reference: per-sample loss sums, then one division by all supervised tokens of the step.
        lm.model.train()
        sums, counts = [], []
        for s in step:
            (row,) = pack_samples([s], 4096, packing=False)
            sums.append(chunked_cross_entropy_sum(lm.model(row.input_ids), lm.model.lm_head_weight, row.labels))
            counts.append(s.n_supervised)
        ref = sum(sums) / sum(counts)
        ref.backward()
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in lora_grads(lm.model).values()])).item()
        lm.model.zero_grad(set_to_none=True)
        per_sample_mean = sum(s.item() / n for s, n in zip(sums, counts)) / len(counts)

        got = trainer.train_step()
        assert got["loss"] == pytest.approx(ref.item(), rel=1e-6)
        assert got["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
        # The samples differ in length, so the mean of per-sample means would be a different number.
        assert len(set(counts)) > 1 and abs(per_sample_mean - ref.item()) > 1e-3
        out[packing] = got
    assert out[True]["loss"] == pytest.approx(out[False]["loss"], rel=1e-6)
    assert out[True]["grad_norm"] == pytest.approx(out[False]["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 6. Assistant masks and system prompts
# ---------------------------------------------------------------------------------------------------------------

def test_labels_cover_exactly_the_assistant_tokens_shifted_by_one(tiny):
    tok, template = tiny.tokenizer, tiny.template
    msgs = [{"role": "system", "content": "Be kind."},
            {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是一个助手。"},
            {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye, take care!"}]
    s = encode_sample(msgs, template, None, 4096)
    ids, labels = s.input_ids, s.labels
    assert len(labels) == len(ids) and labels[-1] == IGNORE
    sup = [t for t, y in enumerate(labels) if y != IGNORE]
    for t in sup:
        assert labels[t] == ids[t + 1]
    # Contiguous supervised runs, one per assistant turn, each predicting exactly "answer<|im_end|>" ... (so nothing
    # else is supervised: not the system or user turns, the headers, or the newline after <|im_end|>)
    runs, start = [], sup[0]
    for a, b in zip(sup, sup[1:] + [None]):
        if b != a + 1:
            runs.append((start, a))
            start = b
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for (a, b), answer in zip(runs, answers):
        assert tok.decode(ids[a + 1 : b + 2], skip_special_tokens=False) == answer + "<|im_end|>"
        # ... and the first answer token is predicted from the last token of the assistant header.
        assert tok.decode(ids[: a + 1], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_system_flag_overrides_template_default_and_row_system_wins(tiny):
    template = tiny.template
    assert template.default_system and "Qwen" in template.default_system
    q = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "An assistant."}]
    text = lambda s: tiny.tokenizer.decode(s.input_ids, skip_special_tokens=False)  # noqa: E731

    plain = text(encode_sample(q, template, None, 4096))
    assert template.default_system in plain
    flagged = text(encode_sample(q, template, "You are a helpful assistant.", 4096))
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in flagged
    assert template.default_system not in flagged
    own = text(encode_sample([{"role": "system", "content": "Row system."}] + q, template,
                             "You are a helpful assistant.", 4096))
    assert "Row system." in own and "You are a helpful assistant." not in own and template.default_system not in own


# ---------------------------------------------------------------------------------------------------------------
# 4. The adapter is a PEFT adapter
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lora_run(qwen_tiny_dir, tmp_path_factory):
    """3 LoRA steps on the tiny Qwen at lr 1e-2, so B has moved well away from zero."""
    root = tmp_path_factory.mktemp("tiny-lora")
    data = write_json(root / "data.json", tiny_rows(8))
    args = SftArgs(model=str(qwen_tiny_dir), dataset=[str(data)], output_dir=str(root / "output"),
                   torch_dtype="float32", max_steps=3, learning_rate=1e-2, per_device_train_batch_size=2,
                   gradient_accumulation_steps=1, save_steps=3, logging_steps=1)
    return run_sft(args, quiet=True).last_checkpoint


def test_adapter_loads_in_peft_with_same_logits(tiny_lora_run, qwen_tiny_dir, tiny):
    import peft
    import transformers

    ckpt = tiny_lora_run
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == PROJECTIONS and not cfg.get("modules_to_save")
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert not [k for k in weights if "lm_head" in k or "embed_tokens" in k]
    assert min(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 1e-3

    ids = torch.tensor([tiny.template.prompt_ids([{"role": "user", "content": "Question 3? And a bit more."}])])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(qwen_tiny_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_base = hf(input_ids=ids).logits
        peft_model = peft.PeftModel.from_pretrained(hf, str(ckpt)).eval()
        ref = peft_model(input_ids=ids).logits

    ours = load_model(qwen_tiny_dir, "float32", "cpu")
    load_adapter(ours.model, ckpt)
    with torch.no_grad():
        got = ours.model.logits(ours.model(ids))
        set_active_adapter(ours.model, None)
        base = ours.model.logits(ours.model(ids))
    # fp32 on CPU, same math in a different order: logits (magnitude ~1) agree to 1e-4.
    torch.testing.assert_close(base, hf_base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (ref - hf_base).abs().max() > 1e-2  # the adapter really changes the output (peft loaded its weights)


# ---------------------------------------------------------------------------------------------------------------
# 5. Resume is exact; full fine-tuning writes a loadable model
# ---------------------------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def test_killed_run_resumes_with_same_losses(qwen_tiny_dir, tmp_path, monkeypatch):
    data = write_json(tmp_path / "data.json", tiny_rows(12))
    # lora_dropout 0.05 (the default) draws from the torch RNG every step, so equal losses after the resume also
    # show the RNG state came back; lr 1e-2 makes the LoRA path (and with it the dropout) matter to the loss.
    base = dict(model=str(qwen_tiny_dir), dataset=[str(data)], torch_dtype="float32", max_steps=6, save_steps=3,
                logging_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-2,
                lora_dropout=0.05)
    run_sft(SftArgs(**base, output_dir=str(tmp_path / "straight")), quiet=True)
    (straight,) = run_folders(tmp_path / "straight")
    want = train_losses(log_records(straight))
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    train_step = Trainer.train_step

    def dies_in_step_5(self):
        if self.step == 4:
            raise Killed
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", dies_in_step_5)
    with pytest.raises(Killed):
        run_sft(SftArgs(**base, output_dir=str(tmp_path / "killed")), quiet=True)
    monkeypatch.undo()
    (killed,) = run_folders(tmp_path / "killed")
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3"]
    n_before = len(log_records(killed))
    assert sorted(train_losses(log_records(killed))) == [1, 2, 3, 4]

    torch.manual_seed(12345)  # a different process would start from other RNG states
    random.seed(12345)
    run_sft(SftArgs(**base, output_dir=str(tmp_path / "killed"), resume_from_checkpoint=str(killed / "checkpoint-3")),
            quiet=True)
    assert run_folders(tmp_path / "killed") == [killed]  # resumed into the same run folder
    records = log_records(killed)
    # the killed run's step-4 line is dropped on resume: every step is logged once
    assert [step_of(r) for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6] and n_before == 4
    resumed = train_losses(records[3:])
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):  # fp32, same ops in the same order: equal to 1e-5
        assert resumed[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5), step
        assert resumed[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step
    a = load_file(str(killed / "checkpoint-6" / "adapter_model.safetensors"))
    b = load_file(str(straight / "checkpoint-6" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    no_tmp_left(tmp_path)


def test_full_fine_tune_checkpoint_is_a_loadable_hf_folder(qwen_tiny_dir, tmp_path):
    pytest.importorskip("tunesmith.export.hf", reason="tunesmith.export.hf (save_hf_folder) is not written yet")
    data = write_json(tmp_path / "data.json", tiny_rows(4))
    trainer = run_sft(SftArgs(model=str(qwen_tiny_dir), dataset=[str(data)], output_dir=str(tmp_path / "out"),
                              train_type="full", torch_dtype="float32", max_steps=1, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, learning_rate=1e-3), quiet=True)
    ckpt = trainer.last_checkpoint
    assert ckpt.name == "checkpoint-1" and (ckpt / "config.json").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert not (ckpt / "adapter_config.json").exists()
    loaded = load_model(ckpt, "float32", "cpu")
    trained = dict(trainer.model.named_parameters())
    original = load_model(qwen_tiny_dir, "float32", "cpu").model.state_dict()
    moved = 0
    for name, p in loaded.model.named_parameters():
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0, msg=name)
        moved += not torch.equal(p, original[name])
    assert moved > 0  # the checkpoint holds the trained weights, not the base's


# ---------------------------------------------------------------------------------------------------------------
# 8. Bad input: one sentence, no traceback, nothing half-written
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Each case's (stderr, exit code, its output dir), all started at once (they mostly wait on imports)."""
    root = tmp_path_factory.mktemp("bad")
    # line 3 lacks the comma between its two fields
    (root / "broken.json").write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    write_json(root / "no_output.json", [{"instruction": "hi", "input": ""}])
    write_json(root / "empty.json", [])
    write_json(root / "good.json", TUTORIAL_ROWS)
    cases = {
        "invalid_json": "--model smollm2-135m-instruct --dataset broken.json",
        "missing_field": "--model smollm2-135m-instruct --dataset no_output.json",
        "empty": "--model smollm2-135m-instruct --dataset empty.json",
        "unknown_flag": "--model smollm2-135m-instruct --dataset good.json --lora_rnk 8",
        "no_model": "--model ./no-such-model --dataset good.json",
        # The model does not exist either: the placeholder refusal must come first, before any model loads.
        "placeholder": "--model ./no-such-model --dataset self-cognition",
    }
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    procs = {k: subprocess.Popen(f"tunesmith sft {v} --output_dir out_{k}", shell=True, cwd=root, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, v in cases.items()}
    out = {}
    for k, p in procs.items():
        _, err = p.communicate(timeout=300)
        out[k] = (err, p.returncode, root / f"out_{k}")
    return out


@pytest.mark.parametrize("case, words", [
    ("invalid_json", ["broken.json", "not valid JSON", "line 3"]),
    ("missing_field", ["no_output.json", "row 1", "'output'"]),
    ("empty", ["empty.json", "no rows"]),
    ("unknown_flag", ["--lora_rnk"]),
    ("no_model", ["no-such-model"]),
    ("placeholder", ["--model_name"]),
])
@pytest.mark.slow  # the tunesmith CLI in subprocesses
def test_bad_input_is_one_sentence_and_leaves_nothing(bad_input_runs, case, words):
    err, code, out_dir = bad_input_runs[case]
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if case == "unknown_flag":  # argparse: its one usage line, then the error
        assert len(lines) == 2 and lines[1].startswith("tunesmith: error: unrecognized arguments"), err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[-1], err
    assert run_folders(out_dir) == [], "a run folder was created for an error caught before training"


@pytest.mark.parametrize("argv, sentence", [
    # each of these once divided by zero, crashed mid-run or mid-answer, or ran and did nonsense
    ("sft --lora_rank 0", "--lora_rank 0: it must be at least 1."),
    ("sft --per-device-train-batch-size 0", "--per_device_train_batch_size 0: it must be at least 1."),
    ("sft --logging_steps 0", "--logging_steps 0: it must be at least 1."),
    ("sft --save_steps 0", "--save_steps 0: it must be at least 1."),
    ("sft --lora_dropout 1.5", "--lora_dropout 1.5: it must be at least 0 and below 1."),
    ("sft --learning_rate -1", "--learning_rate -1.0: it must be above 0."),
    ("sft --warmup_ratio 2", "--warmup_ratio 2.0: it must be at least 0 and at most 1."),
    ("sft --num_train_epochs 0", "--num_train_epochs 0.0: it must be above 0."),
    ("sft --gradient_accumulation_steps 0", "--gradient_accumulation_steps 0: it must be at least 1."),
    ("infer --query hi --top_p 0", "--top_p 0.0: it must be at least 0.0001 and at most 1."),
    ("infer --query hi --temperature -1", "--temperature -1.0: it must be 0 or at least 0.0001 and at most 100."),
    ("infer --query hi --max_new_tokens 0", "--max_new_tokens 0: it must be at least 1."),
    ("infer --query hi --repetition_penalty 0", "--repetition_penalty 0.0: it must be at least 0.01 and at most 100."),
    ("deploy --port 99999", "--port 99999: it must be at least 0 and at most 65535."),
    ("deploy --max_model_len 1", "--max_model_len 1: it must be at least 2."),
])
def test_numbers_outside_their_flags_bounds_are_one_sentence(tmp_path, capsys, monkeypatch, argv, sentence):
    from tunesmith.cli import main

    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "good.json", TUTORIAL_ROWS)
    command, *flags = argv.split()
    extra = ["--dataset", "good.json"] if command == "sft" else []
    assert main([command, "--model", "smollm2-135m-instruct", *extra, *flags]) == 1
    assert capsys.readouterr().err == f"error: {sentence}\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "good.json"]  # refused before anything was written


def test_bounds_admit_their_edges():
    from tunesmith.args import build
    from tunesmith.cli import COMMANDS, parser

    edges = {"sft": {"lora_dropout": 0.0, "warmup_ratio": 1.0, "max_grad_norm": 0.0, "save_total_limit": 1},
             "infer": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 1},
             "deploy": {"port": 0, "max_model_len": 2, "max_num_seqs": 1}}
    for command, values in edges.items():
        argv = [command] + [a for k, v in values.items() for a in (f"--{k}", str(v))]
        args = build(COMMANDS[command][0], parser().parse_args(argv))
        assert {k: getattr(args, k) for k in values} == values


# ---------------------------------------------------------------------------------------------------------------
# 9. Checkpoint rotation, evaluation, over-long samples
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_save_limit_eval_split_and_max_length_drops(qwen_tiny_dir, tmp_path):
    write_json(tmp_path / "data.json", tiny_rows(12, long_every=6))  # rows 5 and 11 are ~200 tokens long
    cmd = (f"tunesmith sft --model {shlex.quote(str(qwen_tiny_dir))} --dataset data.json --torch_dtype float32 "
           "--max_length 64 --split_dataset_ratio 0.25 --max_steps 4 --save_steps 1 --eval_steps 2 "
           "--save_total_limit 2 --per_device_train_batch_size 1 --gradient_accumulation_steps 2 --output_dir out")
    proc, _ = shell(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 12 rows: 3 held out (ceil of 25%), the 2 long ones dropped wherever they landed.
    counts = re.search(r"data: (\d+) training samples, (\d+) eval samples; 2 dropped \(over --max_length 64",
                       proc.stderr)
    assert counts and int(counts[1]) + int(counts[2]) == 10, proc.stderr
    (run,) = run_folders(tmp_path / "out")
    ckpts = sorted(p.name for p in run.glob("checkpoint-*"))
    assert len(ckpts) == 2 and "checkpoint-4" in ckpts, ckpts
    evals = [(step_of(r), r["eval_loss"]) for r in log_records(run) if "eval_loss" in r]
    assert [s for s, _ in evals] == [2, 4] and all(math.isfinite(v) for _, v in evals)
    no_tmp_left(tmp_path)


def test_val_dataset_gives_eval_loss(qwen_tiny_dir, tmp_path):
    train = write_json(tmp_path / "train.json", tiny_rows(4))
    val = write_json(tmp_path / "val.json", tiny_rows(3))
    run_sft(SftArgs(model=str(qwen_tiny_dir), dataset=[str(train)], val_dataset=[str(val)], torch_dtype="float32",
                    max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    output_dir=str(tmp_path / "out")), quiet=True)
    (run,) = run_folders(tmp_path / "out")
    evals = [r for r in log_records(run) if "eval_loss" in r]
    assert [step_of(r) for r in evals] == [2] and evals[0]["eval_loss"] > 0


def test_adamw_matches_torch_fused_adamw_bit_for_bit_and_shares_its_state_dict():
    """train/optim.AdamW drives torch's fused kernel without torch.optim: the same parameters after every step as
    torch.optim.AdamW(fused=True), with weight decay on one group, a parameter without a gradient, lr changed
    between steps (as the schedule does); and each one's state_dict resumes the other exactly."""
    from tunesmith.train.optim import AdamW

    def params(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((16, 8), (8,), (4, 16), (3,))]

    def groups(ps):
        return [{"params": ps[:1] + ps[2:3], "weight_decay": 0.1}, {"params": [ps[1], ps[3]], "weight_decay": 0.0}]

    def run(opt, ps, steps, start=0):
        for k in range(start, start + steps):
            for i, p in enumerate(ps):
                if i != 3 or k % 2:  # ps[3] has no gradient on even steps
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * k + i))
            for g in opt.param_groups:
                g["lr"] = 1e-2 * (1 + k) / 4
            opt.step()
            opt.zero_grad(set_to_none=True)

    ours, theirs = params(0), params(0)
    mine = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=True)
    run(mine, ours, 5)
    run(ref, theirs, 5)
    for a, b, start in zip(ours, theirs, params(0)):
        assert torch.equal(a, b)
        assert not torch.equal(a, start)  # it moved
    # resume across the two: our state into torch's optimizer and torch's into ours, 3 more steps each
    ours2, theirs2 = [p.detach().clone().requires_grad_() for p in ours], [p.detach().clone().requires_grad_() for p in theirs]
    mine2 = AdamW(groups(ours2), lr=1e-2)
    mine2.load_state_dict(ref.state_dict())
    ref2 = torch.optim.AdamW(groups(theirs2), lr=1e-2, fused=True)
    ref2.load_state_dict(copy.deepcopy(mine.state_dict()))  # as through a checkpoint file: torch keeps the tensors
    for opt, ps in ((mine, ours), (ref, theirs), (mine2, ours2), (ref2, theirs2)):
        run(opt, ps, 3, start=5)
    for a, b, c, d in zip(ours, theirs, ours2, theirs2):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    with pytest.raises(ValueError):
        AdamW(groups(params(1))[:1], lr=1e-2).load_state_dict(mine.state_dict())


@pytest.mark.slow  # a subprocess
def test_a_short_training_run_never_imports_the_compiler(qwen_tiny_dir, tmp_path):
    """A LoRA run that does not compile must not import torch._dynamo (torch.optim's optimizers do, ~3.8 s of the
    tutorial's seed job on the H200): a fresh process, the tutorial's flags, 2 steps."""
    data = write_json(tmp_path / "self_cognition.json", TUTORIAL_ROWS)
    code = ("import sys; from tunesmith.cli import main; rc = main(sys.argv[1:]); "
            "print('DYNAMO', 'torch._dynamo' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "sft", "--model", str(qwen_tiny_dir), "--train_type", "lora",
                           "--dataset", str(data), "--max_steps", "2", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DYNAMO False" in proc.stdout
    (run,) = run_folders(tmp_path / "out")
    assert (run / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_an_output_path_the_system_refuses_is_one_sentence(tmp_path, capsys, monkeypatch):
    """--output_dir under a file: before, FileNotFoundError / NotADirectoryError tracebacks from mkdir."""
    from tunesmith.cli import main

    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "good.json", TUTORIAL_ROWS)
    (tmp_path / "a_file").write_text("not a folder")
    for argv in (["sft", "--dataset", "good.json", "--max_steps", "1", "--output_dir", "a_file/out"],
                 ["export", "--to_gguf", "true", "--output_dir", "a_file/out"]):
        assert main([argv[0], "--model", "smollm2-135m-instruct", *argv[1:]]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: cannot use a_file/out (Not a directory); pick another path") and \
            err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "good.json"]


def test_resume_from_something_not_a_checkpoint_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """The model named does not exist: the resume refusal must come first (before: after the model had loaded)."""
    from tunesmith.cli import main

    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "good.json", TUTORIAL_ROWS)
    (tmp_path / "output" / "v0-20250101-000000").mkdir(parents=True)  # a run folder, not one of its checkpoints
    for given, said in (("output/v0-20250101-000000", "output/v0-20250101-000000: no trainer_state.pt; "
                                                      "--resume_from_checkpoint needs a checkpoint written by "
                                                      "tunesmith sft."),
                        ("output/missing", "--resume_from_checkpoint output/missing: no such checkpoint folder.")):
        assert main(["sft", "--model", "./no-such-model", "--dataset", "good.json",
                     "--resume_from_checkpoint", given]) == 1
        assert capsys.readouterr().err == f"error: {said}\n"
