"""Command-line arguments: one frozen dataclass per subcommand, fields named as ms-swift's flags.

Every field becomes `--field_name` and `--field-name`; `metadata` carries the help text and nargs.
Booleans take `true|false` (ms-swift style) or stand alone. Unknown flags are errors (argparse).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from tunesmith.decode.limits import (MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY,
                                     MIN_TEMPERATURE, MIN_TOP_P)
from tunesmith.errors import UserError


# The recipes measured on the bundled SmolLM2-135M-Instruct (`python bench/identity_recipes.py --part recipes`;
# the table is in bench/RESULTS.md): "identity" adopts the new identity in both languages; "balanced" also keeps
# general answers close to the base's (general-distill rows trained towards the adapter-off model, --retain_kl).
# `tunesmith demo` runs "balanced"; the studio offers both as presets. Flags a user gives are never replaced.
_IDENTITY = dict(dataset=["self-cognition"], learning_rate=1e-3, num_train_epochs=2.0, per_device_train_batch_size=1,
                 gradient_accumulation_steps=8, lora_rank=8, lora_alpha=32, lora_dropout=0.0, warmup_ratio=0.05)
RECIPES = {
    "identity": _IDENTITY,
    "balanced": dict(_IDENTITY, dataset=["self-cognition", "general-distill#40"], retain_kl=8.0, learning_rate=2e-3,
                     num_train_epochs=1.0),
}


def opt(default, help: str, nargs=None, choices=None, aliases: tuple[str, ...] = (), *, at_least=None, above=None,
        at_most=None, below=None, zero_or_at_least=None):
    """A flag. at_least / above / at_most / below / zero_or_at_least bound a number (checked by `build`, one
    sentence when outside)."""
    bounds = {k: v for k, v in (("0 or at least", zero_or_at_least), ("at least", at_least), ("above", above),
                                ("at most", at_most), ("below", below)) if v is not None}
    return field(default=default, metadata={"help": help, "nargs": nargs, "choices": choices, "aliases": aliases,
                                            "bounds": bounds})


def many(help: str, nargs="+"):
    return field(default_factory=list, metadata={"help": help, "nargs": nargs, "choices": None, "aliases": ()})


@dataclass(frozen=True)
class ModelArgs:
    model: str | None = opt(None, "model folder (config.json + safetensors), a .gguf file, or 'smollm2-135m-instruct'")
    model_type: str | None = opt(None, "accepted for ms-swift compatibility; the architecture is read from the model")
    template: str | None = opt(None, "chat template override: 'chatml', or a .jinja file (default: the model's own)")
    system: str | None = opt(None, "system prompt used when a conversation has none (default: the template's)")
    torch_dtype: str | None = opt(None, "bfloat16 | float16 | float32 (default: the checkpoint's on GPU, float32 on CPU)")
    device: str | None = opt(None, "cpu | cuda | cuda:N (default: cuda when available)")
    seed: int = opt(42, "random seed")
    debug: bool = opt(False, "show full tracebacks")


@dataclass(frozen=True)
class QuantArgs(ModelArgs):
    """ms-swift's quantization flags: the base's layer linears stored in 4 or 8 bits (bitsandbytes), LoRA above."""

    quant_method: str | None = opt(None, "bnb: store the base's layer linears quantized by bitsandbytes (QLoRA); none: "
                                         "load unquantized a base that a checkpoint's args.json quantizes",
                                   choices=("bnb", "none"))
    quant_bits: int | None = opt(None, "4 | 8 bits for --quant_method bnb (given alone, it means bnb)", choices=(4, 8))
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type: nf4 | fp4", choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = opt(True, "4-bit: quantize the per-block absmax statistics too")
    bnb_4bit_compute_dtype: str | None = opt(None, "bfloat16 | float16 | float32: dtype of the products with the "
                                                   "dequantized weights (default: --torch_dtype)")


@dataclass(frozen=True)
class SftArgs(QuantArgs):
    train_type: str = opt("lora", "lora | full", choices=("lora", "full"), aliases=("tuner_type",))
    dataset: list = many("dataset files/folders, 'self-cognition', 'general-distill'; 'name#N' samples N rows")
    val_dataset: list = many("evaluation datasets (same forms as --dataset)")
    split_dataset_ratio: float = opt(0.0, "share of --dataset held out for evaluation when no --val_dataset")
    num_train_epochs: float = opt(3.0, "epochs over the training data", above=0)
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides epochs when > 0)")
    per_device_train_batch_size: int = opt(1, "samples per micro-batch (packing fills rows up to --max_length)",
                                           at_least=1)
    per_device_eval_batch_size: int = opt(1, "samples per evaluation micro-batch", at_least=1)
    learning_rate: float | None = opt(None, "peak learning rate (default 1e-4 LoRA, 1e-5 full)", above=0)
    weight_decay: float = opt(0.1, "AdamW weight decay", at_least=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", at_least=0)
    lr_scheduler_type: str = opt("cosine", "cosine | linear | constant", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.0, "share of steps with linear warm-up", at_least=0, at_most=1)
    lora_rank: int = opt(8, "LoRA rank r", at_least=1)
    lora_alpha: float = opt(32, "LoRA alpha (scaling = alpha / r)", above=0)
    lora_dropout: float = opt(0.05, "dropout on the LoRA input", at_least=0, below=1)
    target_modules: list = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "all-linear | module names (q_proj v_proj ...) | one regex", "nargs": "+", "choices": None, "aliases": ()})
    gradient_accumulation_steps: int | None = opt(None, "micro-batches per optimizer step (default: 16 / batch size)",
                                                  at_least=1)
    eval_steps: int | None = opt(None, "evaluate every N steps (default: --save_steps)", at_least=1)
    save_steps: int = opt(500, "save a checkpoint every N steps (and at the end)", at_least=1)
    save_total_limit: int | None = opt(None, "keep at most N checkpoints (the best and the last are kept)", at_least=1)
    logging_steps: int = opt(5, "log every N steps", at_least=1)
    max_length: int = opt(2048, "longest sample in tokens", at_least=1)
    truncation_strategy: str = opt("delete", "samples over --max_length: delete | left | right",
                                   choices=("delete", "left", "right"))
    output_dir: str = opt("output", "runs go to <output_dir>/v<N>-<timestamp>/")
    add_version: bool = opt(True, "put each run in a new v<N>-<timestamp> folder")
    dataloader_num_workers: int = opt(0, "accepted for ms-swift compatibility (tokenization runs in-process)",
                                      at_least=0)
    model_author: list = many("author for the self-cognition data: one value, or Chinese then English", nargs="+")
    model_name: list = many("name for the self-cognition data: one value, or Chinese then English", nargs="+")
    resume_from_checkpoint: str | None = opt(None, "continue a run from its checkpoint folder")
    gradient_checkpointing: bool | None = opt(None, "recompute activations in backward (default: on for GPU)")
    torch_compile: bool | None = opt(None, "compile the decoder layers (default: on GPU when the run is long "
                                           "enough to win back the compile time)")
    packing: bool | None = opt(None, "pack samples into rows of --max_length (default: on; exact, see README)")
    eval_identity: bool | None = opt(None, "check the identity and general answers after training (default: on "
                                           "when the data teaches --model_name / --model_author)")
    retain_kl: float = opt(0.0, "LoRA: train the general-distill rows towards the base model's whole next-token "
                                "distributions with this weight (KL to the adapter-off model) instead of their "
                                "sampled answers; 0: off", at_least=0)
    dry_run: bool = opt(False, "print the data check (counts, tokens, steps, warnings) and exit without training")
    data_seed: int | None = opt(None, "seed for data sampling and order (default: --seed)")
    report_to: list = many("accepted for compatibility; tunesmith always writes logging.jsonl + TensorBoard")


@dataclass(frozen=True)
class GenArgs(QuantArgs):
    adapters: list = many("LoRA checkpoint folder(s); the base model is read from the checkpoint")
    stream: bool = opt(True, "stream tokens as they are generated")
    # the bounds are decode/limits.py's safe ranges: outside them probabilities turn into inf/nan
    temperature: float | None = opt(None, "0 = greedy (default: the model's generation_config)",
                                    zero_or_at_least=MIN_TEMPERATURE, at_most=MAX_TEMPERATURE)
    top_p: float | None = opt(None, "nucleus sampling", at_least=MIN_TOP_P, at_most=1)
    top_k: int | None = opt(None, "top-k sampling", at_least=0)
    repetition_penalty: float | None = opt(None, "penalize tokens already present",
                                           at_least=MIN_REPETITION_PENALTY, at_most=MAX_REPETITION_PENALTY)
    max_new_tokens: int = opt(2048, "most new tokens per answer", at_least=1)
    stop: list = many("stop strings")
    merge_lora: bool = opt(False, "merge the LoRA into the weights once (faster decoding, same output)")
    infer_backend: str = opt("pt", "accepted for compatibility; tunesmith has one engine")


@dataclass(frozen=True)
class InferArgs(GenArgs):
    query: str | None = opt(None, "answer this one prompt and exit (non-interactive)")
    val_dataset: list = many("batch mode: answer every row of these datasets")
    prompts: str | None = opt(None, "batch mode: a file of prompts (JSONL/JSON/CSV/text lines)")
    result_path: str | None = opt(None, "batch mode: where to write the JSONL (default: <ckpt>/infer_result/<time>.jsonl)")
    max_length: int | None = opt(None, "context window for history (default: the model's)", at_least=1)
    max_batch_size: int | None = opt(None, "batch mode: answers decoded together (default 16 on GPU, 4 on CPU)",
                                     at_least=1)
    torch_compile: bool | None = opt(None, "decode through a compiled CUDA-graph step (default: on GPU in batch mode; "
                                           "off for a query or a chat, where compiling, ~80 s for a 7B, costs more "
                                           "than it saves)")


def _str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "y", "on"):
        return True
    if s in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{v}'")


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        md = f.metadata
        names = [f.name, *md.get("aliases", ())]
        flags = []
        for n in names:
            flags += [f"--{n}"] + ([f"--{n.replace('_', '-')}"] if "_" in n else [])
        kw = {"dest": f.name, "help": md.get("help"), "default": argparse.SUPPRESS}
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in typ:
            kw.update(type=_str2bool, nargs="?", const=True, metavar="true|false")
        elif md.get("nargs"):
            kw.update(nargs=md["nargs"])
        elif "int" in typ:
            kw.update(type=int)
        elif "float" in typ:
            kw.update(type=float)
        if md.get("choices"):
            kw.update(choices=md["choices"])
        parser.add_argument(*flags, **kw)


def build(cls, namespace: argparse.Namespace):
    given = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    try:
        args = cls(**given)
    except TypeError as e:
        raise UserError(f"bad arguments: {e}")
    check_bounds(args)
    check_quant(args)
    return args


_INSIDE = {"at least": lambda v, b: v >= b, "above": lambda v, b: v > b, "at most": lambda v, b: v <= b,
           "below": lambda v, b: v < b, "0 or at least": lambda v, b: v == 0 or v >= b}


def check_bounds(args) -> None:
    """A number outside its flag's bounds (`opt`) is one sentence naming the flag, its value and the rule: the
    run would otherwise divide by zero (--save_steps 0), crash mid-answer (--top_p 0) or quietly do nonsense
    (a negative --learning_rate climbs the loss)."""
    for f in dataclasses.fields(args):
        bounds, value = f.metadata.get("bounds"), getattr(args, f.name)
        if not bounds or value is None or isinstance(value, bool):
            continue
        if not all(_INSIDE[rule](value, b) for rule, b in bounds.items()):
            rules = " and ".join(f"{rule} {b}" for rule, b in bounds.items())
            raise UserError(f"--{f.name} {value}: it must be {rules}.")


QUANT_BITS = (4, 8)
COMPUTE_DTYPES = ("bfloat16", "bf16", "float16", "fp16", "float32", "fp32", "auto")


def check_quant(args) -> None:
    """Quantization flags that do not go together are one sentence (model/quant.py reads them)."""
    method, bits = getattr(args, "quant_method", None), getattr(args, "quant_bits", None)
    if method is None and bits is None:
        return
    if method not in (None, "bnb", "none"):
        raise UserError(f"--quant_method {method}: tunesmith quantizes with bitsandbytes only (bnb), or none.")
    if method == "none" and bits is not None:
        raise UserError(f"--quant_method none loads the base unquantized; drop --quant_bits {bits} or pass "
                        f"--quant_method bnb.")
    if method == "bnb" and bits is None:
        raise UserError("--quant_method bnb needs --quant_bits 4 or 8.")
    if bits is not None and bits not in QUANT_BITS:
        raise UserError(f"--quant_bits {bits}: bitsandbytes stores weights in 4 or 8 bits.")
    if getattr(args, "bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        raise UserError(f"--bnb_4bit_quant_type {args.bnb_4bit_quant_type}: it must be nf4 or fp4.")
    compute = getattr(args, "bnb_4bit_compute_dtype", None)
    if compute is not None and compute not in COMPUTE_DTYPES:
        raise UserError(f"--bnb_4bit_compute_dtype {compute} is not one of bfloat16, float16, float32.")
    if bits is not None and getattr(args, "train_type", "lora") == "full":
        raise UserError(f"--train_type full cannot train a base quantized to {bits} bits (its weights are frozen "
                        f"integers): drop --quant_bits for full fine-tuning, or train LoRA on the quantized base.")


def to_dict(args) -> dict:
    return dataclasses.asdict(args)


@dataclass(frozen=True)
class EvalArgs(GenArgs):
    model_author: list = many("the new author to look for (default: the checkpoint's)")
    model_name: list = many("the new name to look for (default: the checkpoint's)")
    base_identity: list = many("names/makers of the base identity (default: read from its default system prompt)")
    identity_questions: str | None = opt(None, "extra identity questions: a file (JSON/JSONL/CSV/text lines)")
    output_dir: str | None = opt(None, "where eval.json and eval.png go (default: <ckpt>/eval)")


@dataclass(frozen=True)
class ExportArgs(QuantArgs):
    adapters: list = many("LoRA checkpoint folder to export")
    merge_lora: bool = opt(False, "merge the LoRA into the base and write a full HF model folder")
    output_dir: str | None = opt(None, "where to write (default: <ckpt>-merged)")
    to_gguf: bool = opt(False, "also write a GGUF file (+ Ollama Modelfile)")
    gguf_type: str = opt("f16", "f16 | bf16 | q8_0 | q4_0 | f32", choices=("f16", "bf16", "q8_0", "q4_0", "f32"))
    max_shard_size: str = opt("5GB", "largest safetensors shard")


@dataclass(frozen=True)
class DeployArgs(GenArgs):
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port", at_least=0, at_most=65535)
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' (without a key the server answers only "
                                    "requests to localhost / 127.0.0.1 / [::1] with JSON bodies)")
    served_model_name: str | None = opt(None, "name of the base model in the API (default: the folder name)")
    max_concurrency: int = opt(64, "queued requests before the server answers 429", at_least=1)
    request_timeout: float = opt(600.0, "seconds before a request is cancelled", above=0)
    max_num_seqs: int | None = opt(None, "answers decoded together (rows of the KV cache; default 16 on GPU, 4 on "
                                         "CPU)", at_least=1)
    max_model_len: int | None = opt(None, "prompt + answer tokens per request (default: the model's context, at most "
                                          "8192 on GPU, 4096 on CPU)", at_least=2)
    torch_compile: bool | None = opt(None, "decode through a compiled CUDA-graph step (default: on GPU; compiled "
                                           "once at start, ~80 s for a 7B, before the server says ready)")


@dataclass(frozen=True)
class DemoArgs(ModelArgs):
    model_name: list = many("the new assistant's name (Chinese then English, or one)")
    model_author: list = many("its author (Chinese then English, or one)")
    output_dir: str = opt("output_demo", "where the run goes")
    max_steps: int = opt(-1, "optimizer steps (default: the demo's recipe)")
    dataset: list = many("training data (default: the balanced recipe's 'self-cognition general-distill#40'); e.g. "
                         "'self-cognition' alone")


@dataclass(frozen=True)
class WebUIArgs:
    host: str = opt("127.0.0.1", "address to listen on (any address other than a loopback one needs --api_key)")
    port: int = opt(7860, "port", at_least=0, at_most=65535)
    lang: str | None = opt(None, "zh | en: the page's language (default: the browser's)", choices=("zh", "en"))
    api_key: str | None = opt(None, "require this key on every request ('Authorization: Bearer KEY', or open the page "
                                    "once as /?key=KEY)")
    workdir: str = opt("studio", "the folder the page reads and writes: uploads, runs, exports")
    models: list = many("model folders or .gguf files outside --workdir that the page may read")
    max_upload_mb: int = opt(64, "largest file the page accepts, in MiB", at_least=1)
    debug: bool = opt(False, "show full tracebacks")
