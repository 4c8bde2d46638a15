"""The one training loop of `tunesmith sft`. LoRA vs full is only which parameters train and what gets saved.

Step semantics follow ms-swift / the HF Trainer: an optimizer step consumes per_device_train_batch_size x
gradient_accumulation_steps samples (the last step of an epoch may take fewer), steps per epoch =
ceil(samples / that), data reshuffled every epoch from the seed. The loss of a step is the mean over all of its
supervised tokens, however the samples are packed into rows, so packing changes speed and never the result.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch._functorch.config  # noqa: F401  (activation_memory_budget; not imported by `import torch`)

from tunesmith.args import SftArgs, to_dict
from tunesmith.data.check import Schedule
from tunesmith.data.packing import Sample, pack_samples
from tunesmith.errors import UserError
from tunesmith.files import write_json, writing
from tunesmith.model.load import LoadedModel, load_model
from tunesmith.model.lora import (LoraConfig, apply_lora, lora_modules, read_adapter_weights, save_adapter,
                                  set_active_adapter, stack_lora_inputs)
from tunesmith.runs import ARGS_FILE
from tunesmith.train import checkpoint as ckpt_io
from tunesmith.train import distributed
from tunesmith.train.distributed import DataParallel, SilentLog
from tunesmith.train.logs import RunLog
from tunesmith.train.loss import chunked_cross_entropy_sum, chunked_kl_sum
from tunesmith.train.optim import AdamW
from tunesmith.train.precision import FULL_FP16_REFUSED, LossScaler


def resolve_defaults(args: SftArgs) -> SftArgs:
    """ms-swift's defaults that depend on other flags."""
    lr = args.learning_rate if args.learning_rate is not None else (1e-4 if args.train_type == "lora" else 1e-5)
    ga = args.gradient_accumulation_steps or max(1, math.ceil(16 / args.per_device_train_batch_size))
    quant_method = "bnb" if args.quant_bits and args.quant_method is None else args.quant_method  # bits alone: bnb
    return replace(args, learning_rate=lr, gradient_accumulation_steps=ga, quant_method=quant_method,
                   eval_steps=args.eval_steps or args.save_steps,
                   packing=True if args.packing is None else args.packing,
                   data_seed=args.seed if args.data_seed is None else args.data_seed)


def lr_at(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step` (HF's schedules)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on norms and biases (as the HF Trainer does)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def planned_steps(args: SftArgs, samples: int, world: int = 1) -> int:
    """Optimizer steps of a run: --max_steps, or epochs x ceil(samples / (batch x accumulation x processes))."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    group = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    return max(1, math.ceil(math.ceil(samples / group) * args.num_train_epochs))


def schedule(args: SftArgs, samples: int, world: int = 1) -> Schedule:
    """The steps a run of `samples` samples takes and its learning rate summed over them (the data check's)."""
    total = planned_steps(args, samples, world)
    warmup = math.ceil(args.warmup_ratio * total)
    group = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    lr_sum = sum(args.learning_rate * lr_at(s, total, warmup, args.lr_scheduler_type) for s in range(total))
    return Schedule(total, group, round(total / max(1, math.ceil(samples / group)), 2), lr_sum)


class Trainer:
    def __init__(self, args: SftArgs, lm: LoadedModel, train: list[Sample], val: list[Sample], run_dir: Path,
                 device: torch.device, quiet: bool = False, loss_scaler: LossScaler | None = None):
        """loss_scaler: the dynamic loss scaling of a float16 run (default LossScaler(): GradScaler's settings);
        unused unless the model computes in float16 (train/precision.py)."""
        self.args, self.lm, self.run_dir, self.device = args, lm, run_dir, device
        self.model = lm.model
        # float16 compute: the gradients (LoRA's fp32 A/B's too, through fp16 activations) under- or overflow
        # without loss scaling; full fine-tuning would also lose its updates in fp16 weights, so it is refused.
        self.scaler = None
        if self.model.lm_head_weight.dtype == torch.float16:
            if args.train_type == "full":
                raise UserError(FULL_FP16_REFUSED)
            self.scaler = loss_scaler if loss_scaler is not None else LossScaler()
        self.model.reset_inputs()  # generation's fused q/k/v and gate/up (distill, an earlier eval) go
        self.train_samples, self.val_samples = train, val
        self.dp = DataParallel(device)  # rank 0 of 1 in one process (train/distributed.py)
        self.group = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.dp.world
        self.steps_per_epoch = math.ceil(len(train) / self.group)
        self.total_steps = planned_steps(args, len(train), self.dp.world)
        self.warmup = math.ceil(args.warmup_ratio * self.total_steps)
        # what the memory planner (train/plan.py) or the user chose; unset: neither (the CPU, tests)
        self.checkpointing = bool(args.gradient_checkpointing)
        self.compiled = bool(args.torch_compile)
        if self.compiled:
            # bench/train.py --steps 4 --cases 4x2048 4x2048+compile 4x2048seq+compile on the H200 (2026-12-02):
            # 13.3k tok/s eager, 17.4k compiled (16.0k with rows one by one, as here). Static shapes: rows are
            # padded to a multiple of PAD_MULTIPLE tokens, each length compiles once (recompiles allowed for all).
            self.model.compile_layers(dynamic=False)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       4 * (args.max_length // PAD_MULTIPLE + 1))
        self.lora_cfg = LoraConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.target_modules))
        self.lora_names: list[str] = []
        if args.train_type == "lora":
            self.model.requires_grad_(False)
            self.lora_names = apply_lora(self.model, self.lora_cfg)
            if self.compiled:
                stack_lora_inputs(self.model)  # q/k/v's and gate/up's A products stacked (lora.StackedLoRA)
        else:
            self.model.requires_grad_(True)
        # Lean mode of a LoRA run on the GPU: the embedding table waits in CPU memory (Decoder.park_embeddings).
        self.parked = (self.checkpointing and device.type == "cuda" and args.train_type == "lora"
                       and not self.model.config.tie_embeddings and self.dp.world == 1)
        if self.parked:
            self.model.park_embeddings("cpu")
        self.parallel_model = self.dp.wrap(self.model, full=args.train_type == "full")  # before the optimizer
        # LoRA: torch's fused AdamW kernel without torch.optim, which would import torch._dynamo (train/optim.py).
        # Full fine-tuning keeps torch.optim's: its checkpoints' optimizer state may be DCP shards (FSDP, resumable on
        # any number of processes), whose state-dict functions take only torch.optim optimizers; fused on one GPU
        # (foreach would also hold a temporary copy of the parameters: 15 GB for a 7B), foreach over FSDP's shards.
        groups = param_groups(self.model, args.weight_decay)
        if args.train_type == "full":
            self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                               fused=device.type == "cuda" and self.dp.world == 1)
        else:
            self.optimizer = AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        self.step = 0
        if self.dp.is_main:
            ckpt_io.clean_leftovers(run_dir)  # what a killed run left: half-deleted or half-written checkpoints
        self.log = RunLog(run_dir, self.total_steps, quiet=quiet) if self.dp.is_main else SilentLog()
        self.best: tuple[float, Path] | None = None
        self.losses: list[float] = []

    # -- data order ---------------------------------------------------------------------------------------
    def step_samples(self, step: int) -> list[Sample]:
        """The samples of 0-based optimizer step `step`: a pure function of (data_seed, epoch, step in epoch),
        which is what makes resume exact."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_samples), generator=torch.Generator().manual_seed(self.args.data_seed + epoch))
        idx = order[k * self.group : (k + 1) * self.group].tolist()
        return [self.train_samples[i] for i in idx]

    # -- one optimizer step -------------------------------------------------------------------------------
    def loss_sum(self, rows) -> tuple[torch.Tensor, int]:
        total, n_tokens = None, 0
        for row in rows:
            n_tokens += row.input_ids.numel()
            if self.compiled:
                row = row.padded(PAD_MULTIPLE)
            row = row.to(self.device)
            base_h = self.base_hidden(row) if row.kl else None
            with self.recompute_scope():
                h = self.parallel_model(row.input_ids, position_ids=row.position_ids, seq_ids=row.seq_ids,
                                        checkpoint=self.checkpointing and not self.compiled)
            if row.kl:
                s = self.args.retain_kl * chunked_kl_sum(h, base_h, self.model.lm_head_weight, row.labels)
            else:
                s = chunked_cross_entropy_sum(h, self.model.lm_head_weight, row.labels,
                                              fused=self.compiled and self.device.type == "cuda")
            total = s if total is None else total + s
        return total, n_tokens

    @torch.no_grad()
    def base_hidden(self, row) -> torch.Tensor:
        """The base model's hidden states for a --retain_kl row: the same weights with the adapter switched off."""
        set_active_adapter(self.model, None)
        try:
            return self.model(row.input_ids, position_ids=row.position_ids, seq_ids=row.seq_ids)
        finally:
            set_active_adapter(self.model, "default")

    def recompute_scope(self):
        """Lean mode of compiled layers: rather than torch's checkpoint (which reruns each whole layer),
        AOTAutograd's partitioner with a zero activation budget keeps only each layer's input and recomputes in
        backward just what backward reads, so never the o_proj/down_proj outputs (bench/train.py on the H200,
        4x2048 in one batch: 12.8k tok/s vs 11.9k with torch's checkpoint; rows one by one: 11.8k at 16.8 GiB,
        14.9 GiB with the embeddings parked)."""
        if self.checkpointing and self.compiled:
            return torch._functorch.config.patch(activation_memory_budget=0.0)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        args, dp = self.args, self.dp
        samples = self.step_samples(self.step)[dp.rank :: dp.world]  # this rank's share of the step
        n_sup = dp.sum(sum(s.n_supervised for s in samples))  # the whole step's, over all ranks
        lr = args.learning_rate * lr_at(self.step, self.total_steps, self.warmup, args.lr_scheduler_type)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        t0 = time.time()
        # the loss adds up on the device (float64, as Python floats would): one wait for the GPU per step, not
        # one per row (each would leave the GPU idle while the next row's first kernels are launched)
        loss_acc, n_tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        # Micro-batches of per_device_train_batch_size samples, packed into rows; each backward is scaled by the
        # step's supervised-token count so the accumulated gradient is that of the mean over the whole step.
        # With N ranks: x N, because DDP/FSDP average gradients over ranks; all ranks run as many passes.
        bs = args.per_device_train_batch_size
        micro = [samples[i : i + bs] for i in range(0, len(samples), bs)] if not args.packing else [samples]
        rows = [row for chunk in micro if chunk
                for row in pack_samples(chunk, max(args.max_length, max(len(s.input_ids) for s in chunk)), args.packing)]
        for row, real, last in dp.lockstep(rows):
            with dp.grad_sync(last):
                s, n = self.loss_sum([row])
                loss = s * (dp.world if real else 0) / n_sup
                (loss if self.scaler is None else loss * self.scaler.scale).backward()
            if real:
                loss_acc += s.detach()
                n_tokens += n
        loss_total, n_tokens = dp.sum(loss_acc.item()), dp.sum(n_tokens)
        params = trainable_parameters(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(params)
        if args.max_grad_norm and args.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        # Loss scaling: the norm is not finite exactly when some gradient is (the same on every rank: DDP averaged
        # them); then the step is skipped, the scale halves, and the step counter still advances.
        skipped = self.scaler is not None and not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.time() - t0
        out = {"loss": loss_total / n_sup, "grad_norm": grad_norm, "learning_rate": lr,
               "epoch": round(self.step / self.steps_per_epoch, 4), "tokens": n_tokens, "seconds": dt}
        if self.scaler is not None:
            out.update(skipped=skipped, loss_scale=self.scaler.scale)
        return out

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.val_samples:
            return None
        self.model.eval()
        total, n_sup = 0.0, 0
        bs = self.args.per_device_eval_batch_size
        for i in range(0, len(self.val_samples), bs):
            chunk = self.val_samples[i : i + bs]
            rows = pack_samples(chunk, max(self.args.max_length, max(len(s.input_ids) for s in chunk)), self.args.packing)
            s, _ = self.loss_sum(rows)
            total += s.item()
            n_sup += sum(x.n_supervised for x in chunk)
        return total / max(n_sup, 1)

    # -- checkpoints --------------------------------------------------------------------------------------
    def checkpoint_args(self) -> dict:
        d = to_dict(self.args)
        d.update(model=str(self.lm.path), system=self.args.system, train_type=self.args.train_type,
                 template_source=self.lm.template.source if self.args.template else None)
        return d

    def save(self, eval_loss: float | None) -> Path:
        dp = self.dp
        # Every rank first: FSDP writes its optimizer shards and gathers the weights to rank 0; RNG states of all
        # ranks. Then rank 0 alone writes the checkpoint folder.
        shards = dp.save_sharded_optimizer(self.model, self.optimizer,
                                           self.run_dir / f".checkpoint-{self.step}.optimizer.tmp")
        lm = dp.unsharded(self.lm)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        rank_rng = dp.gather(rng)

        def write(tmp: Path):
            if self.args.train_type == "lora":
                with writing(tmp / "adapter_model.safetensors"):
                    save_adapter(self.model, tmp, self.lora_cfg, str(self.lm.path))
            else:
                from tunesmith.export.hf import save_hf_folder

                with writing(tmp / "model.safetensors"):
                    save_hf_folder(lm, tmp, system=self.args.system)
            if shards is not None:
                os.replace(shards, tmp / distributed.OPTIMIZER_DIR)
            write_json(tmp / ARGS_FILE, self.checkpoint_args())
            ckpt_io.save_trainer_state(tmp, {
                "step": self.step,
                "optimizer": self.optimizer.state_dict() if shards is None else None,
                "rng": rng,
                "rank_rng": rank_rng,
                "log": self.log.records,
                "best": None if self.best is None else [self.best[0], self.best[1].name],
                "loss_scaler": None if self.scaler is None else self.scaler.state_dict(),
            })

        path = self.run_dir / f"checkpoint-{self.step}"
        if dp.is_main:
            path = ckpt_io.save_checkpoint(self.run_dir, self.step, write, self.args.save_total_limit, None)
        if eval_loss is not None and (self.best is None or eval_loss < self.best[0]):
            self.best = (eval_loss, path)
        if dp.is_main:
            ckpt_io.rotate_checkpoints(self.run_dir, self.args.save_total_limit, self.best[1] if self.best else None)
        dp.barrier()
        return path

    def resume(self, ckpt: Path) -> None:
        state = ckpt_io.load_trainer_state(ckpt)
        if self.args.train_type == "lora":
            weights = read_adapter_weights(ckpt)
            for n, m in lora_modules(self.model):
                for part in ("lora_A", "lora_B"):
                    w, dst = weights.get(f"base_model.model.{n}.{part}.weight"), getattr(m, part)["default"].weight
                    if w is None or w.shape != dst.shape:
                        raise ckpt_io.damaged(Path(ckpt) / "adapter_model.safetensors", ValueError(
                            f"{n}.{part} is {'missing' if w is None else f'of shape {tuple(w.shape)}, not {tuple(dst.shape)}'}"))
                    dst.data.copy_(w)
        else:
            self.dp.load_model_state(
                self.model, lambda: load_model(ckpt, self.args.torch_dtype, self.device).model.state_dict())
        self.dp.load_optimizer(self.model, self.optimizer, ckpt, state["optimizer"])
        self.step = state["step"]
        rng = self.dp.own(state.get("rank_rng"), state["rng"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.log.records = list(state.get("log", []))
        self.log.resume(self.step)  # logging.jsonl and TensorBoard forget what came after the checkpoint
        if self.scaler is not None and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])
        if state.get("best"):
            self.best = (state["best"][0], self.run_dir / state["best"][1])

    # -- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> Path:
        args = self.args
        last_ckpt = None
        window_tokens, window_time, window_loss = 0, 0.0, []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while self.step < self.total_steps:
            out = self.train_step()
            window_tokens += out["tokens"]
            window_time += out["seconds"]
            window_loss.append(out["loss"])
            self.losses.append(out["loss"])
            tps = window_tokens / max(window_time, 1e-9)
            self.log.progress(self.step, out["loss"], tps)
            done = self.step == self.total_steps
            skipped = out.get("skipped", False)
            if self.step % args.logging_steps == 0 or done or self.step == 1 or skipped:
                record = {"loss": sum(window_loss) / len(window_loss), "grad_norm": out["grad_norm"],
                          "learning_rate": out["learning_rate"], "epoch": out["epoch"],
                          "tokens_per_second": round(tps, 1), "memory(GiB)": round(peak_memory_gib(self.device), 3)}
                if "loss_scale" in out:  # float16: the scale after this step; a skipped step says so (HF's way)
                    record["loss_scale"] = out["loss_scale"]
                if skipped:  # inf/nan gradients: no optimizer step; the norm is logged as null (strict JSON)
                    record.update(grad_norm=None, skipped="inf/nan gradients: optimizer step skipped, loss scale halved")
                self.log.log(self.step, record)
                window_tokens, window_time, window_loss = 0, 0.0, []
            eval_loss = None
            if self.val_samples and (self.step % args.eval_steps == 0 or done):
                eval_loss = self.evaluate()
                self.log.log(self.step, {"eval_loss": eval_loss})
            if self.step % args.save_steps == 0 or done:
                last_ckpt = self.save(eval_loss)
                self.log.plot()
        self.log.close()
        if self.parked:
            self.model.park_embeddings(self.device)
            self.parked = False
        return last_ckpt


PAD_MULTIPLE = 256  # compiled runs see rows of few distinct lengths: max_length / 256 at most


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:
        return 0.0
