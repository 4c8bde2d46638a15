"""Several processes (torchrun): LoRA under DDP and full fine-tuning under FSDP2 train exactly what one process
trains with the same global batch, and resume from their checkpoints.

CPU, gloo, 2 processes of the tiny Qwen2.5-shaped model (real tokenizer and template), fp32, one thread each.
One process: per_device_train_batch_size 1 x gradient_accumulation_steps 4. Two processes: 1 x 2 x 2 ranks. The
13 rows make 3 steps of 4 samples and a last step of 1, in which rank 1 has no sample and runs a padding pass.
Packing is on (the default): each rank packs its own share, so rows differ from the one-process run and only the
order of additions changes. Measured: losses agree to ~1e-7 relative (LoRA and full), grad norms to ~3e-6 (full,
where the 152k-row lm_head gradient is reduce-scattered); asserted at 1e-5 and 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.args import SftArgs
from tunesmith.commands.sft import run_sft
from tunesmith.errors import UserError
from tunesmith.train.distributed import torchrun_command

TOPICS = ["tea", "rivers", "prime numbers", "the moon", "bicycles", "origami", "volcanoes", "jazz", "bread",
          "glaciers", "chess", "owls", "compilers"]
ROWS = [{"instruction": f"Tell me one fact about {t}." + (" Keep it short." if i % 3 == 0 else ""),
         "input": "" if i % 2 else f"Context {i}: " + "details " * (i % 5),
         "output": f"Here is a fact about {t}: " + "it is interesting " * (1 + i % 4) + "."}
        for i, t in enumerate(TOPICS)]

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE",
              "NNODES", "NODE_RANK", "TORCHELASTIC_RUN_ID")


def common(model: Path, data: Path, train_type: str) -> dict:
    return dict(model=str(model), dataset=[str(data)], train_type=train_type, torch_dtype="float32", device="cpu",
                num_train_epochs=1, logging_steps=1, save_steps=2, lora_dropout=0.0, max_length=512,
                learning_rate=1e-3 if train_type == "lora" else 1e-4, per_device_train_batch_size=1)


def flags(args: dict) -> list[str]:
    out = []
    for k, v in args.items():
        out += [f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out


def sft_2proc(args: dict, cwd: Path, launcher: str) -> subprocess.CompletedProcess:
    """`NPROC_PER_NODE=2 tunesmith sft ...` (ms-swift's way) or `torchrun --nproc_per_node 2 -m tunesmith sft ...`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cli = ["-m", "tunesmith", "sft", *flags(args)]
    if launcher == "env":
        env["NPROC_PER_NODE"] = "2"
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cli]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def only_run(output: Path) -> Path:
    runs = [p for p in output.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # rank 0 alone made the run folder
    return runs[0]


def losses(run: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    steps = [int(r["global_step/max_steps"].split("/")[0]) for r in train]
    assert len(steps) == len(set(steps)), steps  # one line per step: only rank 0 logs
    return dict(zip(steps, train))


def assert_same_steps(got: dict, want: dict, steps, loss_rel: float, norm_rel: float) -> None:
    assert sorted(got) == list(steps)
    for s in steps:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=loss_rel), s
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=norm_rel), s
        assert got[s]["learning_rate"] == pytest.approx(want[s]["learning_rate"], rel=1e-6), s


def resume_copy(checkpoint: Path, where: Path) -> Path:
    """A run folder holding only `checkpoint`: the state a run killed right after saving it leaves behind."""
    target = where / "run" / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.slow  # torchrun, 2 processes
def test_lora_ddp_matches_one_process_and_resumes(qwen_tiny_dir, data, tmp_path):
    base = common(qwen_tiny_dir, data, "lora")
    run_sft(SftArgs(**base, gradient_accumulation_steps=4, output_dir=str(tmp_path / "one")), quiet=True)
    one = only_run(tmp_path / "one")
    p = sft_2proc(dict(base, gradient_accumulation_steps=2, output_dir=str(tmp_path / "two")), tmp_path, "env")
    assert "2 processes (DDP); global batch 4" in p.stderr
    two = only_run(tmp_path / "two")
    want, got = losses(one), losses(two)
    assert_same_steps(got, want, [1, 2, 3, 4], loss_rel=1e-5, norm_rel=1e-4)
    assert got[4]["loss"] < got[1]["loss"] - 0.1  # the adapter learned something, on both sides alike
    a = load_file(str(two / "checkpoint-4" / "adapter_model.safetensors"))
    b = load_file(str(one / "checkpoint-4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")

    # Killed after checkpoint-2, resumed on 2 processes: steps 3 and 4 as in the uninterrupted run.
    ckpt = resume_copy(two / "checkpoint-2", tmp_path / "resumed")
    sft_2proc(dict(base, gradient_accumulation_steps=2, resume_from_checkpoint=str(ckpt)), tmp_path, "env")
    assert_same_steps(losses(ckpt.parent), got, [3, 4], loss_rel=1e-6, norm_rel=1e-6)


@pytest.mark.slow  # torchrun, 2 processes
def test_full_fsdp_matches_one_process_and_resumes(qwen_tiny_dir, data, tmp_path):
    base = dict(common(qwen_tiny_dir, data, "full"), val_dataset=[str(data) + "#2"])
    # (each full checkpoint is ~0.5 GB with the 152k-vocab embeddings and AdamW state: this one saves only the last)
    run_sft(SftArgs(**dict(base, save_steps=4, eval_steps=2), gradient_accumulation_steps=4,
                    output_dir=str(tmp_path / "one")), quiet=True)
    one = only_run(tmp_path / "one")
    p = sft_2proc(dict(base, gradient_accumulation_steps=2, output_dir=str(tmp_path / "two")), tmp_path, "torchrun")
    assert "2 processes (FSDP2); global batch 4" in p.stderr
    two = only_run(tmp_path / "two")
    want, got = losses(one), losses(two)
    assert_same_steps(got, want, [1, 2, 3, 4], loss_rel=1e-5, norm_rel=1e-4)
    evals = lambda run: [json.loads(x)["eval_loss"] for x in (run / "logging.jsonl").read_text().splitlines()  # noqa: E731
                         if "eval_loss" in x]
    assert evals(two) == pytest.approx(evals(one), rel=1e-5) and len(evals(two)) == 2
    # rank 0 wrote the gathered weights as a plain HF folder, and every rank its AdamW shards (DCP)
    ckpt = two / "checkpoint-4"
    assert (ckpt / "optimizer" / ".metadata").is_file() and len(list((ckpt / "optimizer").glob("*.distcp"))) == 2
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(one / "checkpoint-4" / "model.safetensors"))
    original = load_file(str(qwen_tiny_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"].float())

    # Killed after checkpoint-2, resumed on 2 processes (weights scattered from rank 0, shards read by DCP).
    ckpt = resume_copy(two / "checkpoint-2", tmp_path / "resumed")
    sft_2proc(dict(base, gradient_accumulation_steps=2, resume_from_checkpoint=str(ckpt)), tmp_path, "torchrun")
    assert_same_steps(losses(ckpt.parent), got, [3, 4], loss_rel=1e-6, norm_rel=1e-6)
    # ... and in one process: DCP reshards the AdamW state from 2 ranks to 1; the steps are the one-process ones.
    ckpt = resume_copy(two / "checkpoint-2", tmp_path / "resumed_on_one")
    run_sft(SftArgs(**base, gradient_accumulation_steps=4, resume_from_checkpoint=str(ckpt)), quiet=True)
    assert_same_steps(losses(ckpt.parent), want, [3, 4], loss_rel=1e-5, norm_rel=1e-4)


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"NPROC_PER_NODE": "1"}, None),
    ({"NPROC_PER_NODE": "2", "RANK": "0", "LOCAL_RANK": "0"}, None),  # already a torchrun worker
    ({"NPROC_PER_NODE": "4"}, ["--nproc_per_node", "4", "--standalone"]),
    ({"NPROC_PER_NODE": "2", "MASTER_PORT": "29600"}, ["--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                                        "--master_port", "29600"]),
    ({"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"},
     ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29500"]),
])
def test_nproc_per_node_relaunches_through_torchrun(monkeypatch, env, want):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cmd = torchrun_command(["sft", "--model", "m"])
    if want is None:
        assert cmd is None
    else:
        assert cmd == [sys.executable, "-m", "torch.distributed.run", *want, "-m", "tunesmith", "sft", "--model", "m"]


def test_bad_nproc_per_node_is_one_sentence(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "two")
    with pytest.raises(UserError, match="NPROC_PER_NODE=two"):
        torchrun_command(["sft"])
