"""Training in float16 on GPUs without bfloat16 (compute capability below 8.0: T4, V100), with dynamic loss scaling.

`training_dtype` decides the dtype a run computes in (a plain function of the asked dtype, the checkpoint's, the
GPU's capability and the train type, so tests need no GPU). `LossScaler` is torch.amp.GradScaler's dynamic loss
scaling, written out for train/loop.py's Trainer:

- the loss is multiplied by `scale` before backward; gradients are divided by it before clipping and stepping;
- a step whose gradients hold an inf or nan is skipped (no optimizer step, the step counter still advances, as
  the HF Trainer does), and the scale halves; after `growth_interval` good steps in a row it doubles;
- the scale and the count of good steps are part of trainer_state, so a resumed run goes on exactly.

Why not torch.amp.GradScaler itself: the Trainer already computes the gradient norm every step (for clipping and
the log), and that norm is not finite exactly when some gradient is not (or when the norm itself passes float32's
3.4e38, a step no one wants either), so one check of a number the loop already waits for replaces GradScaler's
separate non-finite pass over all gradients and its extra wait for the device in `step`. GradScaler also keeps
whether a step was skipped to itself (the log says it here), keys its state on the optimizer object, and
refuses float16 gradients; written out, the same arithmetic is a dozen lines that work with train/optim.py's AdamW
and torch.optim's alike, on CPU and CUDA.

Full fine-tuning in float16 is refused: the parameters would be float16 with no float32 master copy, and AdamW's
updates at full fine-tuning's learning rates (1e-5 x O(1)) are below float16's resolution for most weights
(2**-11 relative: 5e-4 for a weight of 1), so they would round away and the run would train little or nothing
while looking healthy. LoRA keeps its A/B (and their AdamW state) in float32 and computes in float16, which is
the mixed precision loss scaling is made for.
"""

from __future__ import annotations

import torch

from tunesmith.errors import UserError

FULL_FP16_REFUSED = ("--train_type full with --torch_dtype float16 is refused: without float32 master weights "
                     "AdamW's small updates round away in float16; use --train_type lora, or --torch_dtype float32 "
                     "(or bfloat16 on a GPU of compute capability 8.0 or newer).")


def training_dtype(asked: torch.dtype | None, saved: torch.dtype | None, capability: tuple[int, int] | None,
                   train_type: str) -> tuple[torch.dtype | None, str | None]:
    """The dtype to train in, and a one-line note when it is not the one asked for.

    asked: --torch_dtype (None: the checkpoint's); saved: the checkpoint's own dtype (None: unknown);
    capability: the CUDA device's (major, minor), None off CUDA (then only full + explicit float16 is decided here;
    model/load.cpu_compute_dtype decides the rest). Returns `asked` unchanged (None included) when it stays."""
    if asked == torch.float16 and train_type == "full":
        raise UserError(FULL_FP16_REFUSED)
    if capability is None:
        return asked, None
    want = asked if asked is not None else saved
    bf16 = tuple(capability) >= (8, 0)
    cc = f"{capability[0]}.{capability[1]}"
    if want == torch.bfloat16 and not bf16:
        if train_type == "full":
            return torch.float32, (f"note: this GPU (compute capability {cc}) has no bfloat16 and full fine-tuning "
                                   f"in float16 loses its updates, so training computes in float32.")
        return torch.float16, (f"note: this GPU (compute capability {cc}) has no bfloat16, so training computes in "
                               f"float16 with dynamic loss scaling (LoRA weights stay float32).")
    if want == torch.float16 and asked is None and train_type == "full":  # the checkpoint's float16, not asked for
        to = torch.bfloat16 if bf16 else torch.float32
        name = str(to).removeprefix("torch.")
        return to, (f"note: the checkpoint is float16 and full fine-tuning in float16 loses its updates, so "
                    f"training computes in {name}.")
    return asked, None


def checkpoint_dtype(name) -> torch.dtype | None:
    """The dtype a model folder's config.json names (what load_model uses on CUDA when none is asked); None for a
    GGUF file (loaded in float32), or when unreadable (load_model then says what is wrong)."""
    from tunesmith.files import read_json
    from tunesmith.model.load import DTYPES, resolve_model_path

    try:
        config = resolve_model_path(name) / "config.json"
        raw = read_json(config) if config.is_file() else {}
    except Exception:  # noqa: BLE001  (the load that follows reports it in one sentence)
        return None
    return DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype")))


class LossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's defaults and update rule (see the module's docstring)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0  # GradScaler's growth tracker: good steps since the last change of the scale

    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divide the gradients by the scale, in place (a power of two: exact, as GradScaler's multiply by 1/scale)."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
