"""LoRA as a module swap: each targeted nn.Linear becomes a LoRALinear holding the frozen `base_layer` and, per
adapter name, `lora_A` (r x in) and `lora_B` (out x r). The decoder knows nothing of it. All of LoRA's
arithmetic lives here: one module (LoRALinear), a batch mixing adapters by row (RowAdapters), and the terms of
modules that read one input computed together (lora_terms, stacked_lora_term; StackedLoRA swaps the former into
the decoder's SharedInput slots for compiled training, decode/static.py takes the latter for generation).

  y = base(x) + scaling * B(A(dropout(x))),   scaling = alpha / r,   B starts at zero.

A/B are kept in fp32 (the base may be bf16) so small updates are not rounded away. Several adapters can sit on
one base (serving); `set_active_adapter` picks which one runs, or a `RowAdapters` gives each row of a batch its
own (continuous batching of answers for different adapters: one pass, not one per adapter). Files are PEFT's: adapter_config.json +
adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight`, so peft and vLLM read them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import UserError
from tunesmith.model.quant import QuantLinear

# What LoRA wraps: plain linears, and the quantized frozen ones of a 4/8-bit base (model/quant.py, QLoRA).
LINEARS = (nn.Linear, QuantLinear)

# What "all-linear" means: every projection inside the decoder layers; never lm_head or embeddings (vLLM refuses
# adapters on those, and they are the largest matrices).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class RowAdapters:
    """Each batch row's adapter for one pass over a mixed batch (DecodeSlots). Every LoRALinear holds its adapters'
    A matrices stacked, (n x r) x in, and scaling x B side by side, out x (n x r) (ranks zero-padded to the
    largest, absent adapters zeros); row b's product is masked to its adapter's r columns:

      y_b = base(x_b) + B_cat ((A_cat x_b) * mask_b),   mask_b = 1 on adapter a_b's columns, 0 elsewhere.

    `mask` is one (rows, n x r) tensor shared by every module and updated in place between passes (`assign`), so a
    CUDA graph captured with it serves any mix. Stacks are built here, outside compiled code, and `refresh`
    rewrites them in place where an adapter's weights changed."""

    def __init__(self, model: nn.Module, rows: int, device, dtype):
        mods = lora_modules(model)
        self.names = sorted({n for _, m in mods for n in m.lora_A})
        self.r = max(m.lora_A[n].weight.shape[0] for _, m in mods for n in m.lora_A)
        self.model, self.dtype = model, dtype
        self.mask = torch.zeros(rows, len(self.names) * self.r, device=device, dtype=dtype)
        self._versions: dict = {}
        self._assigned: tuple | None = None
        if self.mask.is_cuda:
            torch._dynamo.mark_static_address(self.mask)
        self.refresh()

    def refresh(self) -> None:
        """(Re)build each module's stacks where its adapters' weights changed since the last build."""
        n, r = len(self.names), self.r
        for name, m in lora_modules(self.model):
            params = [p for a in self.names if a in m.lora_A for p in (m.lora_A[a].weight, m.lora_B[a].weight)]
            key = tuple((p.data_ptr(), p._version) for p in params)
            if self._versions.get(name) == key:
                continue
            base = m.base_layer
            A = torch.zeros(n * r, base.in_features, device=self.mask.device, dtype=self.dtype)
            B = torch.zeros(base.out_features, n * r, device=self.mask.device, dtype=self.dtype)
            for i, a in enumerate(self.names):
                if a in m.lora_A:
                    ra = m.lora_A[a].weight.shape[0]
                    A[i * r : i * r + ra] = m.lora_A[a].weight.detach()
                    B[:, i * r : i * r + ra] = m.lora_B[a].weight.detach() * m.scaling[a]
            if m.rows_stack is not None and m.rows_stack[0].shape == A.shape:
                m.rows_stack[0].copy_(A)  # in place: a captured graph keeps reading them
                m.rows_stack[1].copy_(B)
            else:
                if A.is_cuda:
                    torch._dynamo.mark_static_address(A)
                    torch._dynamo.mark_static_address(B)
                m.rows_stack = (A, B)
            self._versions[name] = key

    def assign(self, adapters: list[str | None]) -> None:
        """Row b runs adapters[b] (None: the base alone) from the next pass on. The mask is copied only when the
        assignment changed, from pinned memory: a plain host-to-GPU copy would make the host wait for the GPU."""
        if tuple(adapters) == self._assigned:
            return
        self._assigned = tuple(adapters)
        n, r = len(self.names), self.r
        mask = torch.zeros(len(adapters), n * r, dtype=self.dtype, pin_memory=self.mask.is_cuda)
        for b, a in enumerate(adapters):
            if a is not None:
                i = self.names.index(a)
                mask[b, i * r : (i + 1) * r] = 1.0
        self.mask.copy_(mask, non_blocking=True)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | RowAdapters | None = None
        self.rows_stack: tuple[torch.Tensor, torch.Tensor] | None = None  # (A_cat, B_cat) for RowAdapters

    @property
    def weight(self):  # code that reads `.weight` (export, lm_head tying) sees the base matrix
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def add_adapter(self, name: str, cfg: LoraConfig, device=None) -> None:
        base = self.base_layer
        device = device or base.weight.device
        A = nn.Linear(base.in_features, cfg.r, bias=False, device=device, dtype=torch.float32)
        B = nn.Linear(cfg.r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # PEFT's default init for A
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        self.active = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        name = self.active
        if name is None:
            return y
        if isinstance(name, RowAdapters):  # each row its own adapter (x: rows x tokens x in)
            A, B = self.rows_stack
            h = F.linear(x, A) * name.mask[:, None, :]
            return y + F.linear(h, B)
        # Master A/B stay fp32; the product runs in the activation dtype (bf16 on GPU), as mixed precision does:
        # an fp32 copy of a (tokens x hidden) activation per projection would cost more than the LoRA math.
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        h = self.lora_dropout[name](x)
        return y + F.linear(F.linear(h, A.to(h.dtype)), B.to(h.dtype)) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32: (out, in)."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]


def shared_adapter(mods) -> str | None:
    """The one adapter active on every module of `mods` with one scaling and no dropout, so that their LoRA terms
    can be computed together (lora_terms, stacked_lora_term); else None."""
    names = {getattr(m, "active", None) for m in mods}
    name = names.pop()
    if names or not isinstance(name, str):
        return None
    if len({m.scaling[name] for m in mods}) > 1 or any(not isinstance(m.lora_dropout[name], nn.Identity) for m in mods):
        return None
    return name


def lora_terms(mods, name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """scaling * B(A x) of each module in `mods` (modules that read the same x, adapter `name` on all of them),
    with their A matrices stacked: x is read by one rank-(sum of r) product instead of one per module, and in
    backward the A gradients come from one product and x's LoRA gradient from one. Products run in x's dtype, as
    LoRALinear's do."""
    A = [m.lora_A[name].weight for m in mods]
    hs = F.linear(x, torch.cat(A).to(x.dtype)).split([a.shape[0] for a in A], -1)
    return [F.linear(h, m.lora_B[name].weight.to(x.dtype)) * m.scaling[name] for m, h in zip(mods, hs)]


def stacked_lora_term(mods, name: str, x: torch.Tensor) -> torch.Tensor:
    """The LoRA terms of `mods` side by side (what adds to their fused product, decode/static.py) in two products:
    A matrices stacked, B matrices block-diagonal,

      s * (x A_cat^T) B_diag^T,   one scaling s for all of them (shared_adapter).

    The gradients reaching each A and B are those of the module-by-module terms (through the stacking)."""
    A = torch.cat([m.lora_A[name].weight for m in mods]).to(x.dtype)
    B = torch.block_diag(*[m.lora_B[name].weight for m in mods]).to(x.dtype)
    return F.linear(F.linear(x, A), B) * mods[0].scaling[name]


class StackedLoRA(nn.Module):
    """The decoder's SharedInput slot (q/k/v, gate/up) for compiled LoRA training: with one adapter on all of its
    modules (no dropout), their LoRA terms come from lora_terms (q/k/v: 3 products of x a layer -> 1, gate/up:
    2 -> 1); otherwise, and outside compiled training, each module on its own. H200, Qwen2.5-7B shapes, LoRA r8
    all-linear: 17,192 -> 17,362 tok/s at 4x2048, lean mode 12,036 -> 12,260, same peaks (bench/train.py, cases
    4x2048+compile vs 4x2048+compile+unstacked)."""

    def forward(self, x: torch.Tensor, *mods: nn.Module) -> list[torch.Tensor]:
        compiled_training = torch.is_grad_enabled() and torch.compiler.is_compiling()
        name = shared_adapter(mods) if compiled_training else None
        if name is None:
            return [m(x) for m in mods]
        return [m.base_layer(x) + t for m, t in zip(mods, lora_terms(mods, name, x))]


def stack_lora_inputs(model: nn.Module) -> None:
    """Swap StackedLoRA into every SharedInput slot of the decoder (the trainer does when it compiles LoRA)."""
    for layer in model.model.layers:
        layer.self_attn.inputs = StackedLoRA()
        layer.mlp.inputs = StackedLoRA()


def target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Module names LoRA will wrap. 'all-linear' | suffix names ('q_proj') | one regex (PEFT: fullmatch)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, LINEARS) and ".layers." in f".{n}"]
    if len(targets) == 1 and targets[0] in ("all-linear", "all_linear", "all"):
        return [n for n in linear if n.rsplit(".", 1)[-1] in ALL_LINEAR]
    if len(targets) == 1 and re.search(r"[\\^$*+?()\[\]|]", targets[0]):
        try:
            pat = re.compile(targets[0])
        except re.error as e:
            raise UserError(f"--target_modules '{targets[0]}' is not a valid regular expression ({e}).")
        chosen = [n for n in linear if pat.fullmatch(n)]
    else:
        chosen = [n for n in linear if n.rsplit(".", 1)[-1] in targets]
    if not chosen:
        raise UserError(f"--target_modules {' '.join(targets)} matches no linear layer; use all-linear or names "
                        f"such as {', '.join(ALL_LINEAR)}.")
    return chosen


def apply_lora(model: nn.Module, cfg: LoraConfig, name: str = "default", targets: list[str] | None = None) -> list[str]:
    """Wrap the target linears (or reuse existing wrappers) and add adapter `name`. Returns the module names."""
    names = targets if targets is not None else target_names(model, cfg.target_modules)
    for full in names:
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name)
        mod = getattr(parent, child)
        if not isinstance(mod, LoRALinear):
            mod = LoRALinear(mod)
            setattr(parent, child, mod)
        mod.add_adapter(name, cfg)
    return names


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_active_adapter(model: nn.Module, name: str | RowAdapters | None) -> None:
    """Which adapter runs (None: the plain base model; a RowAdapters: each row its own)."""
    for _, m in lora_modules(model):
        m.active = name if (name is None or isinstance(name, RowAdapters) or name in m.lora_A) else None


def active_adapter(model: nn.Module) -> str | None:
    """The one adapter that runs now (None: the plain base model, no LoRA at all, or a RowAdapters mix)."""
    return next((m.active for _, m in lora_modules(model) if isinstance(m.active, str)), None)


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-named tensors of one adapter."""
    out = {}
    for n, m in lora_modules(model):
        if name in m.lora_A:
            out[f"base_model.model.{n}.lora_A.weight"] = m.lora_A[name].weight.detach().contiguous()
            out[f"base_model.model.{n}.lora_B.weight"] = m.lora_B[name].weight.detach().contiguous()
    return out


def peft_config(cfg: LoraConfig, module_names: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in module_names}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, out_dir: Path, cfg: LoraConfig, base_model: str, name: str = "default") -> None:
    from safetensors.torch import save_file

    state = adapter_state(model, name)
    modules = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in state})
    from tunesmith.files import writing

    with writing(out_dir / "adapter_model.safetensors"):
        save_file({k: v.float().cpu() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    with writing(out_dir / "adapter_config.json"):
        (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(cfg, modules, base_model), indent=2))


def read_adapter_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors; a missing, damaged or truncated file is one sentence naming it."""
    from safetensors.torch import load_file

    path = Path(ckpt) / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{ckpt}: no adapter_model.safetensors; --adapters needs a LoRA checkpoint folder.")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (safetensors' header, size and JSON errors: the file is damaged)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160].rstrip(".")
        raise UserError(f"{path} is damaged or truncated ({reason}); use an earlier checkpoint, or copy this one "
                        f"again.") from None


def read_adapter_config(ckpt: Path) -> dict:
    from tunesmith.files import read_json

    path = Path(ckpt) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{ckpt}: no adapter_config.json; --adapters needs a LoRA checkpoint folder "
                        f"(a full fine-tune checkpoint goes to --model).")
    return read_json(path)


def check_adapter_config(raw, ckpt: Path) -> None:
    """The fields a LoRA adapter_config.json must hold; a damaged one is one sentence naming the file."""
    fields = {"r": int, "lora_alpha": (int, float), "target_modules": (list, str)}
    bad = [k for k, t in fields.items() if not isinstance(raw, dict) or not isinstance(raw.get(k), t)
           or isinstance(raw.get(k), bool)]
    if bad:
        raise UserError(f"{Path(ckpt) / 'adapter_config.json'} is damaged ({', '.join(repr(k) for k in bad)} "
                        f"{'is' if len(bad) == 1 else 'are'} missing or not valid); use an earlier checkpoint, or "
                        f"copy this one again.")


def load_adapter(model: nn.Module, ckpt: Path, name: str = "default") -> LoraConfig:
    """Add a saved PEFT LoRA adapter to the model under `name` and make it active."""
    raw = read_adapter_config(ckpt)
    if raw.get("use_dora") or raw.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{ckpt}: only plain LoRA adapters are supported (this one is {raw.get('peft_type')}, "
                        f"use_dora={raw.get('use_dora')}).")
    check_adapter_config(raw, ckpt)
    targets = raw["target_modules"]
    cfg = LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=0.0,
                     target_modules=(targets,) if isinstance(targets, str) else tuple(targets))
    state = read_adapter_weights(ckpt)
    modules = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in state})
    known = {n for n, m in model.named_modules() if isinstance(m, (*LINEARS, LoRALinear))}
    missing = [m for m in modules if m not in known]
    if missing:
        raise UserError(f"{ckpt}: the adapter targets {missing[0]}, which this base model does not have; "
                        f"it was trained for a different base model (pass the right one with --model).")
    apply_lora(model, cfg, name, targets=modules)
    for n, m in lora_modules(model):
        if n not in modules:
            continue
        a, b = state.get(f"base_model.model.{n}.lora_A.weight"), state.get(f"base_model.model.{n}.lora_B.weight")
        if a is None or b is None:
            raise UserError(f"{Path(ckpt) / 'adapter_model.safetensors'} is damaged (it lacks the lora_A or lora_B "
                            f"tensor of {n}); use an earlier checkpoint, or copy this one again.")
        if a.shape != m.lora_A[name].weight.shape or b.shape != m.lora_B[name].weight.shape:
            raise UserError(f"{ckpt}: adapter tensor shapes for {n} ({tuple(b.shape)} x {tuple(a.shape)}) do not fit "
                            f"this base model; it was trained for a different base model (pass it with --model).")
        with torch.no_grad():
            m.lora_A[name].weight.copy_(a)
            m.lora_B[name].weight.copy_(b)
    set_active_adapter(model, name)
    return cfg


def merge_lora(model: nn.Module, name: str = "default") -> None:
    """Fold adapter `name` into the base weights (fp32 math, cast back) and unwrap every LoRALinear.

    Idempotent by construction: after merging there are no LoRA modules left to apply a second time. A quantized
    base (QuantLinear) is refused: its integers cannot hold W + BA."""
    quantized = next((m.base_layer for _, m in lora_modules(model) if isinstance(m.base_layer, QuantLinear)), None)
    if quantized is not None:
        raise UserError(f"--merge_lora true cannot merge into a base quantized to {quantized.bits} bits; merge into the "
                        f"full-precision base with `tunesmith export --adapters CKPT --merge_lora true`, or load the "
                        f"base unquantized with --quant_method none.")
    for full, m in lora_modules(model):
        base = m.base_layer
        if name in m.lora_A:
            with torch.no_grad():
                base.weight.copy_((base.weight.float() + m.delta_weight(name).to(base.weight.device)).to(base.weight.dtype))
        parent_name, _, child = full.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
