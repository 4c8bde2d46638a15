"""The pre-flight estimate of a planned `tunesmith sft` run, measured on this machine by a short probe:

    python -m tunesmith.studio.estimate OUT.json -- <the run's sft flags>

The probe is a process of its own that does what the run will do, with the same code (commands/sft.py and
train/loop.py): reads the data, loads the model, makes a sample of the general-distill answers when the data asks
for them, encodes, plans (train/plan.py), then runs PROBE_STEPS of the run's own optimizer steps (its largest step,
then its first ones), saves one checkpoint and times one batch of the identity check's answers. From these:

  time    = the measured phases before training (process start, data, load, encode, setup)
          + general-distill: the measured batch x the batches the run will make
          + training: the run's tokens / the measured tokens per second (steps after the first), plus the first
            step's extra (warm-up, compiling)
          + checkpoints: the run's saves x the measured save
          + the identity check after an identity run: its answers x the measured seconds per answer
  memory  = the probe's measured peak (CPU: the process's peak resident memory; GPU: the allocator's peak, as sft
            reports them) for the mode the run will use, through the run's largest step; the other modes from train/plan.py's
            estimates, shifted by the same difference between measured and planned where a measurement exists.

OUT.json gets the estimate (or {"error": sentence}); the same sentence is printed as `error: ...`.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

PROBE_STEPS = 4
CHECK_BATCH = 16


def probe(args, steps: int = PROBE_STEPS) -> dict:
    import torch

    from tunesmith.args import check_quant
    from tunesmith.train.setup import (check_retain_kl, identity_terms, load_training_data, plan_base, plan_training,
                                       process_start_time, seed_everything)
    from tunesmith.data.check import check_data, teaches_identity
    from tunesmith.data.packing import encode_dataset
    from tunesmith.errors import UserError
    from tunesmith.model.load import cpu_compute_dtype, load_model, parse_dtype, pick_device
    from tunesmith.model.quant import QuantConfig, quant_modules, quantize_linears
    from tunesmith.train.loop import Trainer, peak_memory_gib, planned_steps, resolve_defaults, schedule
    from tunesmith.train.plan import GIB, device_budget_gib, estimate_gib, linear_params, NF4_BYTES
    from tunesmith.train.precision import checkpoint_dtype, training_dtype

    phases: dict[str, float] = {}
    started = process_start_time()
    last = time.time()
    phases["startup"] = round(last - started, 2) if started else 0.0

    def mark(name: str) -> None:
        nonlocal last
        now = time.time()
        phases[name] = round(now - last, 3)
        last = now

    args = resolve_defaults(args)
    check_quant(args)
    check_retain_kl(args)
    seed_everything(args.seed)
    device = pick_device(args.device)
    if not args.model:
        raise UserError("no --model given; pass a model folder, a .gguf file or 'smollm2-135m-instruct'.")
    train_convs, val_convs, distill, sources = load_training_data(args)
    mark("data")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    dtype, _ = training_dtype(parse_dtype(args.torch_dtype), checkpoint_dtype(args.model) if capability else None,
                              capability, args.train_type)
    dtype, _ = cpu_compute_dtype(args.torch_dtype if dtype is None else dtype, device)
    if device.type == "cuda" and args.quant_bits is None and args.quant_method != "none":
        args = plan_base(args, train_convs, device, True)
    lm = load_model(args.model, dtype, device, QuantConfig.from_args(args, parse_dtype(dtype)))
    mark("load")
    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-estimate-"))
    distill_s, proxies = 0.0, []
    if distill:
        from tunesmith.data.self_cognition import general_distill_instructions
        from tunesmith.evaluate.distill import BATCH, general_distill

        wanted = sum(int(s.partition("#")[2] or len(general_distill_instructions())) for s in distill)
        unique = min(wanted, len(general_distill_instructions()))
        t = time.time()
        rows = general_distill(lm, f"general-distill#{min(BATCH, wanted)}", tmp, args.data_seed, args.system, True)
        batch_s = time.time() - t
        distill_s = batch_s * math.ceil(unique / BATCH)
        proxies = [rows[i % len(rows)] for i in range(wanted)] if rows else []
        last = time.time()
    identity = teaches_identity(args.dataset, train_convs, identity_terms(args))
    check, samples = check_data(lm.template, args.system, args.max_length, args.truncation_strategy, sources,
                                train_convs + proxies, len(val_convs), lambda n: schedule(args, n), identity)
    train = [s for s in samples if s is not None]
    val, _ = encode_dataset(val_convs, lm.template, args.system, args.max_length, args.truncation_strategy)
    if not train:
        raise UserError(f"no training sample is left: all {len(samples)} are longer than --max_length "
                        f"{args.max_length} or have no assistant answer.")
    mark("encode")
    plan = plan_training(args, lm, train, device)
    if plan.quant_bits and not quant_modules(lm.model):
        quantize_linears(lm.model, QuantConfig(4, compute_dtype=lm.model.lm_head_weight.dtype))
        args = replace(args, quant_method="bnb", quant_bits=4)
    args = replace(args, gradient_checkpointing=plan.checkpointing, torch_compile=plan.compile)
    group = args.per_device_train_batch_size * args.gradient_accumulation_steps
    total_steps = planned_steps(args, len(train))
    # the run's own steps (train/loop.py's order: a pure function of the data seed): step 1 of the probe is the
    # run's largest step (its peak memory, and the warm-up), the others its first steps (the rate)
    run_steps = run_step_samples(train, group, total_steps, args.data_seed)
    largest = max(run_steps, key=lambda ss: sum(len(x.input_ids) for x in ss))
    picked = [largest] + run_steps[: steps - 1]
    probe_args = replace(args, max_steps=steps, save_steps=10**9, eval_steps=10**9, save_total_limit=None,
                         num_train_epochs=1.0)
    trainer = Trainer(probe_args, lm, train, [], tmp, device, quiet=True)
    trainer.step_samples = lambda step: picked[step]
    mark("setup")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = [trainer.train_step() for _ in range(steps)]
    timed = measured[1:] or measured
    tok_s = sum(m["tokens"] for m in timed) / max(sum(m["seconds"] for m in timed), 1e-9)
    first_extra = max(0.0, measured[0]["seconds"] - measured[0]["tokens"] / tok_s)
    t = time.time()
    trainer.log.log(trainer.step, {"loss": measured[-1]["loss"]})
    trainer.save(None)
    trainer.log.plot()
    save_s = time.time() - t
    peak = peak_memory_gib(device)  # as sft reports it: the process's peak (CPU) or the allocator's (GPU)
    trainer.log.close()

    lengths = [len(s.input_ids) for s in train]
    run_tokens = sum(len(x.input_ids) for ss in run_steps for x in ss)
    saves = sum(1 for s in range(1, total_steps + 1) if s % args.save_steps == 0 or s == total_steps)
    evals = sum(1 for s in range(1, total_steps + 1) if s % args.eval_steps == 0 or s == total_steps) if val else 0
    eval_tokens = sum(len(s.input_ids) for s in val)
    check_runs = (identity if args.eval_identity is None else args.eval_identity) and args.train_type == "lora"
    check_s = identity_check_seconds(lm, args.system) if check_runs else 0.0

    parts = {
        "startup": phases["startup"], "data": phases["data"], "load": phases["load"], "distill": round(distill_s, 1),
        "encode": phases["encode"], "setup": phases["setup"],
        "train": round(run_tokens / tok_s + first_extra, 1),
        "checkpoints": round(saves * save_s, 1),
        "eval_loss": round(evals * eval_tokens / (3 * tok_s), 1),  # forward only: about a third of a step's work
        "identity_check": round(check_s, 1),
    }
    cfg = lm.config
    row = max(lengths)
    budget = device_budget_gib(device)
    modes = {}
    for name, mode, ttype in (("lora", "bf16", "lora"), ("lean", "lean", "lora"), ("4bit", "4bit", "lora"),
                              ("4bit-lean", "4bit-lean", "lora"), ("full", "bf16", "full"), ("full-lean", "lean", "full")):
        dtype_bytes = 4 if device.type == "cpu" else lm.model.lm_head_weight.element_size()
        modes[name] = estimate_gib(cfg, mode, min(row * group, max(args.max_length, row)) if args.packing else row,
                                   ttype, args.lora_rank, plan.compile, dtype_bytes)
    used = {"bf16": "lora", "lean": "lean", "4bit": "4bit", "4bit-lean": "4bit-lean"}[plan.mode]
    if args.train_type == "full":
        used = "full-lean" if plan.checkpointing else "full"
    if device.type == "cpu":
        # the CPU has no lean mode or parked embeddings: what the planner would save there stays resident; the
        # measured process (Python, torch, the model) is the base the others are counted from
        shift = peak - modes[used]
        modes = {k: v + shift for k, v in modes.items()}
        modes["lean"], modes["4bit-lean"], modes["full-lean"] = modes["lora"], modes["4bit"], modes["full"]
        quant_saving = linear_params(cfg) * (4 - NF4_BYTES) / GIB
        modes["4bit"] = modes["4bit-lean"] = modes["lora"] - quant_saving
    else:
        shift = peak - modes[used]
        modes = {k: v + shift for k, v in modes.items()}
    free = budget if budget is not None else available_gib()
    if device.type == "cuda":
        why = plan.line()
    else:
        why = (f"CPU: {args.train_type} in {str(lm.model.lm_head_weight.dtype).removeprefix('torch.')} (no GPU memory "
               f"plan); measured peak {peak:.2f} GiB of {free:.1f} GiB available")
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "mode": used, "why": why, "compile": plan.compile,
        "steps": total_steps, "samples": len(train), "tokens": int(run_tokens), "tokens_per_second": round(tok_s, 1),
        "probe_steps": steps, "probe_seconds": [round(m["seconds"], 3) for m in measured],
        "seconds": round(sum(parts.values()), 1), "parts_s": parts,
        "memory_gib": round(peak, 3), "free_gib": round(free, 2) if free is not None else None,
        "modes_gib": {k: round(v, 2) for k, v in modes.items()},
        "fits": {k: (free is None or v <= free) for k, v in modes.items()},
        "train_type": args.train_type,
    }


def run_step_samples(train: list, group: int, total_steps: int, seed: int) -> list[list]:
    """The samples of each optimizer step of the run, as Trainer.step_samples picks them."""
    import torch

    per_epoch = math.ceil(len(train) / group)
    out, order = [], None
    for step in range(total_steps):
        epoch, k = divmod(step, per_epoch)
        if k == 0 or order is None:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append([train[i] for i in order[k * group:(k + 1) * group]])
    return out


def identity_check_seconds(lm, system) -> float:
    """The identity check's time (evaluate/report.py: 40 identity questions and 30 general prompts, answered by
    base and tuned, plus a KL pass per general prompt), from one measured batch of CHECK_BATCH answers."""
    import torch

    from tunesmith.data.self_cognition import general_prompts, identity_eval_questions
    from tunesmith.decode.generator import Generator
    from tunesmith.decode.sampling import SamplingConfig
    from tunesmith.evaluate.report import IDENTITY_TOKENS, RETENTION_TOKENS

    lm.model.eval()
    questions = identity_eval_questions()
    gen = Generator(lm)
    ids = [gen.chat_prompt([{"role": "user", "content": q["question"]}], system) for q in questions[:CHECK_BATCH]]
    t = time.time()
    answers = list(gen.complete_many(ids, SamplingConfig(max_new_tokens=IDENTITY_TOKENS, temperature=0.0),
                                     rows=CHECK_BATCH))
    per_answer = (time.time() - t) / len(answers)
    t = time.time()
    with torch.inference_mode():
        for a, p in zip(answers[:4], ids[:4]):
            lm.model(torch.tensor([p + a.token_ids], device=lm.model.lm_head_weight.device))
    per_forward = (time.time() - t) / 4
    n_general = len(general_prompts())
    answers_n = 2 * len(questions) + 2 * n_general * RETENTION_TOKENS / IDENTITY_TOKENS
    return per_answer * answers_n + 2 * n_general * per_forward


def available_gib() -> float:
    from tunesmith.data.sources import available_memory

    return available_memory() / 2**30


def main(argv: list[str]) -> int:
    from tunesmith import args as A
    from tunesmith.cli import parser
    from tunesmith.errors import UserError
    from tunesmith.files import write_json

    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m tunesmith.studio.estimate OUT.json -- <sft flags>", file=sys.stderr)
        return 2
    out = Path(argv[0])
    try:
        args = A.build(A.SftArgs, parser().parse_args(["sft", *argv[2:]]))
        result = probe(args)
    except UserError as e:
        write_json(out, {"error": str(e)})
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_json(out, result)
    print(f"estimate: {result['seconds']:.0f} s, {result['memory_gib']:.2f} GiB ({result['why']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
