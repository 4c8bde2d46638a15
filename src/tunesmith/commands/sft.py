"""`tunesmith sft`: load the data and the model, train (train/loop.py's Trainer), write the run folder, and say
what to do with the checkpoint (the vLLM check, the identity report with --eval_identity)."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from tunesmith.args import SftArgs, check_quant, to_dict
from tunesmith.data.check import check_data, teaches_identity
from tunesmith.data.packing import encode_dataset
from tunesmith.errors import UserError
from tunesmith.files import WriteError, write_json
from tunesmith.model.load import LoadedModel, cpu_compute_dtype, load_model, parse_dtype, pick_device
from tunesmith.model.quant import QuantConfig, quant_modules, quantize_linears
from tunesmith.runs import ARGS_FILE, discard_unused_run_dir, new_run_dir
from tunesmith.train import distributed
from tunesmith.train.checkpoint import (check_checkpoint_files, check_resumable, check_same_run, checkpoint_step,
                                       resume_hint)
from tunesmith.train.loop import (Trainer, peak_memory_gib, planned_steps, resolve_defaults, schedule,
                                  trainable_parameters)
from tunesmith.train.plan import Plan
from tunesmith.train.precision import checkpoint_dtype, training_dtype
from tunesmith.train.setup import (check_retain_kl, identity_terms, load_training_data, plan_base, plan_training,
                                   process_start_time, seed_everything)


def dry_run(args: SftArgs, train_convs: list, val_convs: list, distill: list[str], sources: dict[str, int]) -> None:
    """--dry_run true: the data check through the model's tokenizer and template (no weights load), on stdout;
    nothing is written. general-distill answers are made by the model when a run starts, so they are counted,
    not measured."""
    from tunesmith.data.check import check_data, teaches_identity
    from tunesmith.data.self_cognition import general_distill_instructions
    from tunesmith.model.load import load_template

    if not args.model:
        raise UserError("no --model given; pass a model folder, a .gguf file or 'smollm2-135m-instruct'.")
    pending = 0
    for spec in distill:
        _, _, n = spec.partition("#")
        if n and not n.isdigit():
            raise UserError(f"--dataset {spec}: the part after '#' must be a number of rows, e.g. general-distill#200.")
        sources[spec] = int(n) if n else len(general_distill_instructions())
        pending += sources[spec]
    template = load_template(args.model)
    if args.template:
        from tunesmith.session import named_template

        template = named_template(args.template, template.tokenizer)
    identity = teaches_identity(args.dataset, train_convs, identity_terms(args))
    check, _ = check_data(template, args.system, args.max_length, args.truncation_strategy, sources, train_convs,
                          len(val_convs), lambda n: schedule(args, n), identity, pending)
    print("\n".join(check.lines()))


def prewarm() -> None:
    """Imports the run needs later, made while the model loads (shard reads and host-to-GPU copies leave the
    interpreter free): the run log's TensorBoard, the loss plot's matplotlib. (torch._dynamo is not needed
    unless the run compiles: train/optim.py.)"""
    import importlib

    try:
        importlib.import_module("torch.utils.tensorboard")
        importlib.import_module("matplotlib").use("Agg")  # the plot's backend (RunLog.plot): no display
        importlib.import_module("matplotlib.pyplot")
    except Exception:  # noqa: BLE001  (a missing optional module is imported, and reported, where used)
        pass


class Phases:
    """Wall seconds of a run's phases, for summary.json: `startup` is from the process's start (Python and the
    imports) to the run's; each `mark(name)` closes the phase since the previous mark."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.time()
        started = process_start_time()
        if started is not None:
            self.seconds["startup"] = round(self._last - started, 2)

    def mark(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now


def out_of_memory(trainer: Trainer, plan: Plan, run_dir: Path) -> str:
    """The one sentence for a CUDA out-of-memory error during training."""
    peak = peak_memory_gib(trainer.device)
    saved = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    kept = f"the checkpoints already written are intact (last: {saved[-1]})" if saved else "no checkpoint was written yet"
    less = [] if plan.checkpointing else ["--gradient_checkpointing true"]
    less += [f"--max_length {max(256, trainer.args.max_length // 2)}"]
    return (f"the GPU ran out of memory at step {trainer.step + 1} of {trainer.total_steps} while training in "
            f"{plan.mode} mode (estimated {plan.estimate_gib} GiB, peak {peak:.1f} GiB before the failure); "
            f"{kept}; retry with {' or '.join(less)}.")


def identity_check(trainer: Trainer, last: Path, lr_sum: float, quiet: bool) -> dict:
    """After an identity run: held-out identity questions and general prompts, base against tuned (the report of
    `tunesmith eval`, evaluate/report.py), saved in <checkpoint>/eval/, with advice when it fell short."""
    from tunesmith.evaluate.report import advice, report_for_checkpoint

    report = report_for_checkpoint(last, last / "eval", trainer.lm, quiet)
    for line in advice(report, trainer.checkpoint_args(), lr_sum):
        if not quiet:
            print(line, file=sys.stderr)
    return report


def sft(args: SftArgs) -> int:
    try:
        run_sft(args)
    finally:
        distributed.teardown()
    return 0


class RunStart:
    """How far run_sft got: the run folder it made (None when resuming into an existing one) and whether training
    began; a run that fails before that leaves no run folder behind."""

    def __init__(self):
        self.fresh_dir: Path | None = None
        self.training = False


def run_sft(args: SftArgs, lm: LoadedModel | None = None, quiet: bool = False) -> Trainer | None:
    """Train as `args` say; `lm` may be a model already loaded from args.model (the demo reuses its copy). None when
    --resume_from_checkpoint names a finished run's checkpoint and no more steps are asked (nothing is written)."""
    start = RunStart()
    try:
        return _run_sft(args, lm, quiet, start)
    except BaseException:
        main = not distributed.active() or torch.distributed.get_rank() == 0
        if start.fresh_dir is not None and not start.training and main:
            discard_unused_run_dir(start.fresh_dir)
        raise


def fit(trainer: Trainer) -> Path:
    """trainer.fit(); an error ends the progress line first, so the error's sentence has a line of its own."""
    try:
        return trainer.fit()
    except BaseException:
        trainer.log.end_line()
        raise


def finished_run(resume: Path, done: int, total: int) -> str:
    """The one line for a resume with nothing left to train."""
    return (f"{resume} is at step {done} and this run asks for {total} step{'' if total == 1 else 's'}, so its run is "
            f"finished and nothing was written; pass a larger --max_steps or --num_train_epochs to train further.")


def _run_sft(args: SftArgs, lm: LoadedModel | None, quiet: bool, start: RunStart) -> Trainer | None:
    phases = Phases()
    args = resolve_defaults(args)
    check_quant(args)  # before the data and the model load
    check_retain_kl(args)
    seed_everything(args.seed)
    device = distributed.setup(pick_device(args.device))  # under torchrun: join the group, this rank's device
    resume = Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if resume is not None:
        check_resumable(resume)  # before the data and the model load
        check_checkpoint_files(resume)
        check_same_run(resume, to_dict(args))
        done = checkpoint_step(resume)
        if args.max_steps and args.max_steps > 0 and done >= args.max_steps:
            if not quiet:
                print(finished_run(resume, done, args.max_steps), file=sys.stderr)
            return None
    train_convs, val_convs, distill, sources = load_training_data(args, strict=not args.dry_run)
    phases.mark("data")
    if args.dry_run:
        dry_run(args, train_convs, val_convs, distill, sources)
        return None
    if not args.model:
        raise UserError("no --model given; pass a model folder, a .gguf file or 'smollm2-135m-instruct'.")
    if lm is None:
        # bfloat16 (asked, or the checkpoint's) on a GPU below compute capability 8.0: float16 with loss scaling
        # (train/precision.py); full fine-tuning in float16 is refused here, before the model loads.
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        dtype, note = training_dtype(parse_dtype(args.torch_dtype), checkpoint_dtype(args.model) if capability else None,
                                     capability, args.train_type)
        if note and not quiet:
            print(note, file=sys.stderr)
        # --torch_dtype bfloat16 on a CPU without bf16. Timed before prewarm starts: beside its importing thread the
        # float32 product measured 0.5-0.6 GFLOP/s instead of ~45 on the 2-core CI machine (2026-12-01), as slow
        # as bf16's.
        dtype, note = cpu_compute_dtype(args.torch_dtype if dtype is None else dtype, device)
        if note and not quiet:
            print(note, file=sys.stderr)
        if device.type == "cuda" and args.quant_bits is None and args.quant_method != "none":
            args = plan_base(args, train_convs, device, quiet)  # a 4-bit base when bf16 cannot fit
        warm = threading.Thread(target=prewarm, daemon=True)
        warm.start()
        lm = load_model(args.model, dtype, device, QuantConfig.from_args(args, parse_dtype(dtype)))
        warm.join()
    phases.mark("load")
    quantized = next((m for _, m in quant_modules(lm.model)), None)
    if quantized is not None and args.train_type == "full":  # a folder stored quantized by bitsandbytes
        raise UserError(f"--train_type full cannot train {lm.path}: its layer linears are stored in {quantized.bits} "
                        f"bits (bitsandbytes); train LoRA on it, or fully fine-tune an unquantized model.")
    if args.template:
        from tunesmith.session import override_template

        override_template(lm, args.template)
    run_dir = resume.parent if resume is not None else distributed.on_main(
        lambda: new_run_dir(args.output_dir, args.add_version))
    if resume is None and args.add_version:
        start.fresh_dir = run_dir
    distill_convs = []
    if distill:
        from tunesmith.evaluate.distill import general_distill

        for spec in distill:
            rows = distributed.on_main(lambda: general_distill(lm, spec, run_dir, args.data_seed, args.system, quiet))
            sources[spec] = len(rows)
            distill_convs += rows
    world = torch.distributed.get_world_size() if distributed.active() else 1
    identity = teaches_identity(args.dataset, train_convs, identity_terms(args))
    check, samples = check_data(lm.template, args.system, args.max_length, args.truncation_strategy, sources,
                                train_convs + distill_convs, len(val_convs), lambda n: schedule(args, n, world), identity)
    n_plain = len(train_convs)
    train = ([s for s in samples[:n_plain] if s is not None]
             + [replace(s, kl=args.retain_kl > 0) for s in samples[n_plain:] if s is not None])
    dropped = len(samples) - len(train)
    train_convs += distill_convs
    val, dropped_val = encode_dataset(val_convs, lm.template, args.system, args.max_length, args.truncation_strategy)
    if resume is not None and train:  # epochs: the steps they make depend on the samples left after encoding
        total = planned_steps(args, len(train), torch.distributed.get_world_size() if distributed.active() else 1)
        if done >= total:
            if not quiet:
                print(finished_run(resume, done, total), file=sys.stderr)
            return None
    if not quiet and (not distributed.active() or torch.distributed.get_rank() == 0):
        print("\n".join(check.lines()), file=sys.stderr)
    if not train:
        raise UserError(f"no training sample is left: all {len(train_convs)} are longer than --max_length "
                        f"{args.max_length} or have no assistant answer.")
    phases.mark("encode")
    plan = plan_training(args, lm, train, device)
    if plan.quant_bits and not quant_modules(lm.model):  # the rows turned out longer than their bound
        quantize_linears(lm.model, QuantConfig(4, compute_dtype=lm.model.lm_head_weight.dtype))
        args = replace(args, quant_method="bnb", quant_bits=4)
    args = replace(args, gradient_checkpointing=plan.checkpointing, torch_compile=plan.compile)
    trainer = Trainer(args, lm, train, val, run_dir, device, quiet=quiet)
    phases.mark("setup")
    main = trainer.dp.is_main  # rank 0 alone writes and talks
    if main and resume is None:  # a resume rewrites it once the checkpoint has loaded
        write_json(run_dir / ARGS_FILE, trainer.checkpoint_args())
    n_params = sum(p.numel() for p in trainable_parameters(lm.model))
    say = (lambda *a: None) if quiet or not main else (lambda *a: print(*a, file=sys.stderr))
    say(f"run: {run_dir}")
    say(f"data: {len(train)} training samples, {len(val)} eval samples"
        + (f"; {dropped + dropped_val} dropped (over --max_length {args.max_length} or no answer)" if dropped + dropped_val else ""))
    base_kind = f"{next(lm.model.parameters()).dtype}" + (
        f", layer linears {'4-bit ' + quantized.quant_type if quantized.bits == 4 else '8-bit int8'} computing in "
        f"{str(quantized.compute_dtype).removeprefix('torch.')}" if quantized is not None else "")
    say(f"model: {lm.path} on {device} ({base_kind}); trainable parameters {n_params:,} "
        f"({args.train_type}); {trainer.total_steps} steps of {trainer.group} samples, lr {args.learning_rate}")
    if device.type == "cuda":
        say(plan.line())
    if trainer.dp.world > 1:
        say(f"data parallel: {trainer.dp.world} processes ({trainer.dp.engine}); global batch {trainer.group} = "
            f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
            f"{trainer.dp.world} processes")
    if resume is not None:
        trainer.resume(resume)
        if main:
            write_json(run_dir / ARGS_FILE, trainer.checkpoint_args())
        say(f"resumed at step {trainer.step} from {resume}")
    start.training = True
    t0 = time.time()
    try:
        last = fit(trainer)
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory(trainer, plan, run_dir)) from None
    except WriteError as e:  # logging.jsonl, TensorBoard or loss.png (a checkpoint's own failure says this already)
        raise e.again(hint=resume_hint(run_dir)) from None
    trainer.seconds = time.time() - t0
    phases.mark("fit")
    summary = {"steps": trainer.total_steps, "seconds": round(time.time() - t0, 1), "phases_s": phases.seconds,
               "peak_memory_gib": round(peak_memory_gib(device), 3), "last_checkpoint": str(last),
               "best_checkpoint": str(trainer.best[1]) if trainer.best else None,
               "final_loss": trainer.losses[-1] if trainer.losses else None}
    if main:
        try:
            write_json(run_dir / "summary.json", summary)
        except WriteError as e:
            raise e.again(hint=f"the training is done and its checkpoints are complete (last: {last}); only this "
                               f"summary is missing") from None
    say(f"done: {summary['steps']} steps in {summary['seconds']} s, peak memory {summary['peak_memory_gib']} GiB")
    say(f"checkpoint: {last}")
    flag = "--adapters" if args.train_type == "lora" else "--model"
    say(f"try it:  tunesmith infer {flag} {last} --stream true --temperature 0 --max_new_tokens 2048")
    if args.train_type == "lora":
        from tunesmith.export.vllm_check import vllm_report

        say(vllm_report(last))
    check_identity = check.teaches_identity if args.eval_identity is None else args.eval_identity
    if check_identity and args.train_type == "lora" and main:
        identity_check(trainer, last, check.lr_sum, quiet)
    elif check_identity and main:
        say(f"identity check: run  tunesmith eval --model {last}  (it loads the base beside the fine-tuned model)")
    trainer.last_checkpoint = last
    return trainer
