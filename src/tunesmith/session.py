"""A base model with its adapters, found from checkpoints: what infer, eval, export and deploy share.

`load_for_generation` finds the base model, template and system prompt from a checkpoint's args.json (unless
given), loads the base once and puts every adapter on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tunesmith.args import GenArgs
from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import LoadedModel, load_model, pick_device
from tunesmith.model.lora import load_adapter, merge_lora, set_active_adapter
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
    src = CHATML if template == "chatml" else Path(template).read_text() if Path(template).is_file() else None
    if src is None:
        raise UserError(f"--template '{template}': give 'chatml' or a .jinja file.")
    lm.template = ChatTemplate(src, lm.tokenizer)


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


def load_for_generation(args: GenArgs, device: str | None = None) -> Session:
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
    dev = device or pick_device(args.device)
    lm = load_model(base, args.torch_dtype, dev)
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
