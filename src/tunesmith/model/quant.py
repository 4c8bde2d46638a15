"""A quantized, frozen base for LoRA (QLoRA): the decoder layers' projections stored in bitsandbytes' formats.

  --quant_bits 4   NF4 or FP4 (--bnb_4bit_quant_type), blocks of 64 weights sharing one absmax; with
                   --bnb_4bit_use_double_quant the absmaxes are themselves quantized to 8 bits (blocks of 256).
                   bitsandbytes.functional.quantize_4bit / dequantize_4bit; the storage is Linear4bit's.
  --quant_bits 8   int8 with one absmax per output row (LLM.int8's weight format: CB int8 + SCB float32),
                   bitsandbytes.functional.int8_vectorwise_quant of the fp16 weight, as bnb's Int8Params does.

`QuantLinear` replaces an nn.Linear (a module swap, as LoRA's; LoRALinear wraps it as `base_layer`). It keeps
`in_features`, `out_features`, `bias` (full precision, frozen) and `weight` (the packed integers, a frozen
Parameter: `.device` and the memory planner's byte count read it). Its product is

  y = x W~^T + b,   W~ = dequantize(weight) in the compute dtype (--bnb_4bit_compute_dtype, default the model's),

through an autograd function that dequantizes again in backward instead of keeping W~: gradients reach x (and
the LoRA above it), and no layer's full-precision weight outlives its product. The same arithmetic on CPU and
CUDA, which is why 8-bit takes this path rather than bnb.matmul: LLM.int8 also quantizes the activations
(outlier columns aside) and its CPU path casts float32 inputs to float16, so it is not the product with the
dequantized weight, and training on it would differ between devices.

Quantization happens while the weights load (model/load.py: each safetensors shard or GGUF tensor is read to the
CPU, its layer linears are quantized on the target device and the full-precision copy is dropped), so the
unquantized model is never whole in GPU memory. Folders already quantized by bitsandbytes (config.json with a
bitsandbytes `quantization_config`, e.g. the `*-bnb-4bit` uploads) load as they are (`from_saved`).

bitsandbytes is imported on first use only: plain runs never pay its import (~1-3 s).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import UserError

BLOCKSIZE = 64  # bitsandbytes' (and transformers') 4-bit block on CUDA and CPU
# The decoder layers' projections, by checkpoint name; never embeddings, lm_head or norms.
TARGET = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def is_target(name: str) -> bool:
    return TARGET.match(name) is not None


def _bnb():
    try:
        import bitsandbytes.functional as BF
    except ImportError:
        raise UserError("--quant_bits needs the bitsandbytes package: pip install bitsandbytes") from None
    return BF


SHORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # what --bnb_4bit_compute_dtype accepts


@dataclass(frozen=True)
class QuantConfig:
    bits: int  # 4 | 8
    quant_type: str = "nf4"  # 4-bit: nf4 | fp4
    double_quant: bool = True  # 4-bit: quantize the absmaxes too
    compute_dtype: torch.dtype | None = None  # None: the dtype the model loads in

    @classmethod
    def from_args(cls, args, dtype: torch.dtype | None = None) -> "QuantConfig | None":
        """The quantization `args` ask for (SftArgs, GenArgs: --quant_method/--quant_bits/--bnb_4bit_*, checked by
        args.check_quant), None for none. dtype: the model's (the default compute dtype)."""
        bits = getattr(args, "quant_bits", None)
        if not bits or getattr(args, "quant_method", None) == "none":
            return None
        compute = getattr(args, "bnb_4bit_compute_dtype", None)
        return cls(bits=int(bits), quant_type=args.bnb_4bit_quant_type, double_quant=bool(args.bnb_4bit_use_double_quant),
                   compute_dtype=getattr(torch, SHORT_DTYPES.get(compute, compute)) if compute and compute != "auto"
                   else dtype)

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit int8 (bitsandbytes)"
        return f"4-bit {self.quant_type}{' + double quant' if self.double_quant else ''} (bitsandbytes)"


@dataclass
class QuantizedWeight:
    """One linear's weight in a bitsandbytes format: `data` (4-bit: packed uint8, (out*in/2, 1); 8-bit: int8
    (out, in)) and its statistics, all on one device."""

    bits: int
    shape: tuple[int, int]  # (out, in)
    data: torch.Tensor
    stats: dict[str, torch.Tensor]  # 4-bit: absmax, quant_map [, nested_absmax, nested_quant_map, nested_offset]; 8-bit: SCB
    quant_type: str = "int8"
    blocksize: int = BLOCKSIZE
    dtype: torch.dtype = torch.float32  # 4-bit: what dequantize_4bit returns (the dtype it was quantized from)
    nested_blocksize: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + sum(t.numel() * t.element_size() for t in self.stats.values())


def quantize(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """w (out, in), float, on the device to quantize on (where the result stays)."""
    BF = _bnb()
    w = w.detach()
    shape = (w.shape[0], w.shape[1])
    if cfg.bits == 8:
        # fp16 in (the CUDA kernel takes only fp16; bnb's Int8Params casts the same way), row absmax out
        cb, scb, _ = BF.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return QuantizedWeight(8, shape, cb, {"SCB": scb})
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    data, st = BF.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=cfg.double_quant,
                                quant_type=cfg.quant_type)
    return _from_state(shape, data, st)


def _from_state(shape, data, st) -> QuantizedWeight:
    stats = {"absmax": st.absmax, "quant_map": st.code}
    nested = None
    if st.nested:
        stats.update(nested_absmax=st.state2.absmax, nested_quant_map=st.state2.code,
                     nested_offset=st.offset.reshape(()).float())
        nested = st.state2.blocksize
    return QuantizedWeight(4, shape, data, stats, st.quant_type, st.blocksize, st.dtype, nested)


def from_saved(prefix: str, tensors: dict[str, torch.Tensor], source: str) -> QuantizedWeight:
    """The weight `prefix` ("model.layers.0.self_attn.q_proj") of a folder saved by transformers + bitsandbytes,
    from its tensors (names without the prefix: "weight", "weight.absmax", ... ; 8-bit: "weight", "SCB")."""
    w = tensors.get("weight")
    if w is None:
        raise UserError(f"{source}: {prefix}.weight is missing; the quantized checkpoint is incomplete.")
    if w.dtype == torch.int8:
        if "SCB" not in tensors:
            raise UserError(f"{source}: {prefix} is int8 without its {prefix}.SCB scales; the 8-bit checkpoint is "
                            f"incomplete.")
        return QuantizedWeight(8, (w.shape[0], w.shape[1]), w, {"SCB": tensors["SCB"].float()})
    packed = [k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")]
    if w.dtype != torch.uint8 or len(packed) != 1:
        raise UserError(f"{source}: {prefix}.weight is {w.dtype} without a bitsandbytes quant_state; tunesmith reads "
                        f"bitsandbytes 4-bit (uint8 + quant_state) and 8-bit (int8 + SCB) checkpoints.")
    meta = json.loads(bytes(tensors[packed[0]].tolist()).decode("utf-8"))
    shape = tuple(meta["shape"])
    stats = {"absmax": tensors["weight.absmax"], "quant_map": tensors["weight.quant_map"].float()}
    nested = None
    if "weight.nested_absmax" in tensors:
        stats.update(nested_absmax=tensors["weight.nested_absmax"].float(),
                     nested_quant_map=tensors["weight.nested_quant_map"].float(),
                     nested_offset=torch.tensor(float(meta["nested_offset"])))
        nested = int(meta["nested_blocksize"])
    return QuantizedWeight(4, (shape[0], shape[1]), w, stats, meta["quant_type"], int(meta["blocksize"]),
                           getattr(torch, meta["dtype"]), nested)


class _Dequantize:
    """What the autograd function needs to rebuild W~: the layout (constants) of one QuantLinear."""

    __slots__ = ("bits", "shape", "quant_type", "blocksize", "dtype", "nested_blocksize", "names")

    def __init__(self, q: QuantizedWeight):
        self.bits, self.shape, self.quant_type, self.blocksize = q.bits, q.shape, q.quant_type, q.blocksize
        self.dtype, self.nested_blocksize = q.dtype, q.nested_blocksize
        self.names = tuple(q.stats)

    def __call__(self, data: torch.Tensor, *stats: torch.Tensor) -> torch.Tensor:
        BF = _bnb()
        s = dict(zip(self.names, stats))
        if self.bits == 8:
            return BF.int8_vectorwise_dequant(data, s["SCB"])  # float32: CB * SCB / 127
        state2, offset = None, None
        if self.nested_blocksize is not None:
            state2 = BF.QuantState(absmax=s["nested_absmax"], code=s["nested_quant_map"], blocksize=self.nested_blocksize,
                                   dtype=torch.float32)
            offset = s["nested_offset"]
        st = BF.QuantState(absmax=s["absmax"], shape=torch.Size(self.shape), code=s["quant_map"],
                           blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype, offset=offset,
                           state2=state2)
        return BF.dequantize_4bit(data, st)


class _QuantProduct(torch.autograd.Function):
    """x W~^T + b with W~ rebuilt in backward (never saved): the gradient reaches x only (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, bias, dequant, data, *stats):
        ctx.dequant = dequant
        ctx.save_for_backward(data, *stats)
        return F.linear(x, dequant(data, *stats).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * (4 + len(ctx.saved_tensors) - 1)
        data, *stats = ctx.saved_tensors
        grad_x = grad @ ctx.dequant(data, *stats).to(grad.dtype)
        return (grad_x, None, None, None, *(None,) * len(stats))


class QuantLinear(nn.Module):
    """A frozen linear whose weight is stored quantized (module docstring). `weight` is the packed integers;
    `dequantized()` the full-precision matrix; forward the product with it in `compute_dtype`."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.quant_type, self.compute_dtype = q.bits, q.quant_type, compute_dtype
        self.weight = nn.Parameter(q.data, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        for name, t in q.stats.items():
            self.register_buffer(name, t)
        self._dequant = _Dequantize(q)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> "QuantLinear":
        return cls(quantize(linear.weight, cfg), linear.bias, cfg.compute_dtype or linear.weight.dtype)

    def _stats(self) -> list[torch.Tensor]:
        return [self._buffers[n] for n in self._dequant.names]

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W~ (out, in) in `dtype` (default the compute dtype)."""
        return self._dequant(self.weight, *self._stats()).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _QuantProduct.apply(xc, bias, self._dequant, self.weight, *self._stats())
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Moves go through; dtype casts (model.to(bfloat16)) leave the statistics in float32, as quantized."""
        kept = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        kind = "int8" if self.bits == 8 else self.quant_type
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


def quant_modules(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def quantize_linears(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Swap every decoder-layer projection (q/k/v/o/gate/up/down; a LoRALinear's base) for a QuantLinear, in
    place, one at a time (each full-precision weight is freed as it goes). Returns the module names."""
    done = []
    for name, mod in list(model.named_modules()):
        base = getattr(mod, "base_layer", mod)
        if type(base) is not nn.Linear or not is_target(name + ".weight"):
            continue
        q = QuantLinear.from_linear(base, cfg)
        if base is mod:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
        else:
            mod.base_layer = q
        done.append(name)
    return done


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Every QuantLinear back to an nn.Linear holding W~ in `dtype` (merging a LoRA into a base that was only
    ever stored quantized: export of a pre-quantized folder)."""
    for name, mod in list(model.named_modules()):
        base = getattr(mod, "base_layer", mod)
        if not isinstance(base, QuantLinear):
            continue
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        lin.weight = nn.Parameter(base.dequantized(dtype), requires_grad=False)
        if base.bias is not None:
            lin.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        if base is mod:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
        else:
            mod.base_layer = lin


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (quantized weights and their statistics included)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
