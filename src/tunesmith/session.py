"""A base model with its adapters, found from checkpoints: what infer, eval, export and deploy share.

`load_for_generation` finds the base model, template and system prompt from a checkpoint's args.json (unless
given), loads the base once and puts every adapter on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace
from pathlib import Path

from tunesmith.args import GenArgs, check_quant
from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import LoadedModel, load_model, parse_dtype, pick_device
from tunesmith.model.lora import load_adapter, merge_lora, set_active_adapter
from tunesmith.model.quant import QuantConfig, dequantize_linears, is_quantized
from tunesmith.runs import read_checkpoint_args
from tunesmith.text.template import CHATML, ChatTemplate


@dataclass
class Session:
    """A loaded base model with its adapters, and what the checkpoints say about how they were trained."""

    lm: LoadedModel
    adapters: dict[str, Path]  # name -> checkpoint folder
    system: str | None  # the system prompt used in training (or --system)
    ckpt_args: dict  # args.json of the first checkpoint ({} for a plain model)
    compiled: bool | None = None  # Generator's `compiled` (None: on GPU)

    @cached_property
    def generator(self) -> Generator:
        """One for the session: every answer of a chat reuses its static KV cache and compiled decode step (a new
        Generator per answer would allocate and record them again)."""
        return Generator(self.lm, compiled=self.compiled)


def override_template(lm: LoadedModel, template: str) -> None:
    lm.template = named_template(template, lm.tokenizer)


def named_template(template: str, tokenizer) -> ChatTemplate:
    """--template: 'chatml' or a .jinja file, over the model's tokenizer."""
    src = CHATML if template == "chatml" else Path(template).read_text() if Path(template).is_file() else None
    if src is None:
        raise UserError(f"--template '{template}': give 'chatml' or a .jinja file.")
    return ChatTemplate(src, tokenizer)


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """'CKPT' or 'NAME=CKPT' -> {name: path}; a single unnamed adapter is called 'default'."""
    out = {}
    for i, s in enumerate(specs):
        name, _, path = s.rpartition("=") if "=" in s else ("", "", s)
        name = name or ("default" if len(specs) == 1 else Path(path).parent.name + "-" + Path(path).name)
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"--adapters {path}: no such checkpoint folder.")
        out[name] = p
    return out


def generation_quant(args: GenArgs, ckpt_args: dict) -> QuantConfig | None:
    """The base's quantization: the flags when given (--quant_method none: unquantized), else the one the checkpoint
    was trained on (its args.json), so that the adapter runs over the base it learned on."""
    if getattr(args, "quant_method", None) or getattr(args, "quant_bits", None):
        check_quant(args)
        return QuantConfig.from_args(args, parse_dtype(args.torch_dtype))
    if not ckpt_args.get("quant_bits") or ckpt_args.get("quant_method") == "none":
        return None
    trained = SimpleNamespace(
        quant_method="bnb", quant_bits=ckpt_args["quant_bits"],
        bnb_4bit_quant_type=ckpt_args.get("bnb_4bit_quant_type") or "nf4",
        bnb_4bit_use_double_quant=ckpt_args.get("bnb_4bit_use_double_quant", True),
        bnb_4bit_compute_dtype=getattr(args, "bnb_4bit_compute_dtype", None) or ckpt_args.get("bnb_4bit_compute_dtype"))
    return QuantConfig.from_args(trained, parse_dtype(args.torch_dtype))


def load_for_generation(args: GenArgs, device: str | None = None, unquantized: bool = False) -> Session:
    """unquantized: the base in full precision whatever the checkpoint trained on (export merges into it); a folder
    stored quantized by bitsandbytes is dequantized."""
    adapters = parse_adapter_specs(args.adapters)
    ckpt_args = read_checkpoint_args(next(iter(adapters.values()))) if adapters else {}
    if args.model:
        base = args.model
    elif adapters:
        base = ckpt_args.get("model")
        if not base:
            from tunesmith.model.lora import read_adapter_config

            base = read_adapter_config(next(iter(adapters.values()))).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{next(iter(adapters.values()))}: the checkpoint does not name its base model; pass --model.")
    else:
        raise UserError("no --model or --adapters given; pass a model folder, a .gguf file or 'smollm2-135m-instruct'.")
    quant = None if unquantized else generation_quant(args, ckpt_args)
    if quant is not None and args.merge_lora and adapters:
        raise UserError(f"--merge_lora true cannot merge into a base quantized to {quant.bits} bits; merge into the "
                        f"full-precision base with `tunesmith export --adapters CKPT --merge_lora true`, or load the "
                        f"base unquantized with --quant_method none.")
    dev = device or pick_device(args.device)
    lm = load_model(base, args.torch_dtype, dev, quant)
    if unquantized and is_quantized(lm.model):  # a folder stored by bitsandbytes: its dequantized weights
        dequantize_linears(lm.model, lm.model.lm_head_weight.dtype)
    template = args.template or (ckpt_args.get("template") if ckpt_args.get("template") else None)
    if template:
        override_template(lm, template)
    for name, path in adapters.items():
        load_adapter(lm.model, path, name)
    if args.merge_lora and adapters:
        if len(adapters) > 1:
            raise UserError("--merge_lora true works with one adapter; several adapters are served unmerged.")
        merge_lora(lm.model, next(iter(adapters)))
    elif adapters:
        set_active_adapter(lm.model, next(iter(adapters)))
    system = args.system if args.system is not None else ckpt_args.get("system")
    return Session(lm, adapters, system, ckpt_args)


def sampling_from(args: GenArgs, lm: LoadedModel) -> SamplingConfig:
    d = lm.generation_defaults
    pick = lambda v, k, default: v if v is not None else d.get(k, default)  # noqa: E731
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=pick(args.temperature, "temperature", 0.0),
        top_p=pick(args.top_p, "top_p", 1.0),
        top_k=pick(args.top_k, "top_k", 0) or 0,
        repetition_penalty=pick(args.repetition_penalty, "repetition_penalty", 1.0),
        seed=args.seed,
        stop=tuple(args.stop),
    )
