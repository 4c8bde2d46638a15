"""`tunesmith infer`: interactive streaming chat, one `--query`, or batch answers to a dataset.

`load_for_generation` is shared by infer, eval and deploy: it finds the base model, template and system prompt
from a checkpoint's args.json (unless given), loads the base once and puts every adapter on it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tunesmith.args import GenArgs, InferArgs
from tunesmith.errors import UserError
from tunesmith.generate import Generator, SamplingConfig
from tunesmith.model.load import LoadedModel, load_model, pick_device
from tunesmith.model.lora import load_adapter, merge_lora, set_active_adapter
from tunesmith.text.template import CHATML, ChatTemplate
from tunesmith.train.checkpoint import read_checkpoint_args


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


def infer(args: InferArgs) -> int:
    session = load_for_generation(args)
    cfg = sampling_from(args, session.lm)
    batch = bool(args.val_dataset or args.prompts)
    # Compiling the decode step takes 80-85 s for a 7B on an H200 and then decodes at ~170 tok/s instead of 35-50
    # (bench/infer.py): it pays for many answers (batch mode), not for one query or a chat's first minutes.
    session.compiled = args.torch_compile if args.torch_compile is not None else (None if batch else False)
    if args.query is not None:
        answer(session, [{"role": "user", "content": args.query}], cfg, args.stream)
        return 0
    if batch:
        return batch_infer(session, args, cfg)
    return chat_loop(session, args, cfg)


def answer(session: Session, messages: list[dict], cfg: SamplingConfig, stream: bool, out=None) -> str:
    """Print one answer (streamed or whole) and return its text. Ctrl-C stops the answer, keeps what came."""
    out = out or sys.stdout
    gen = session.generator
    ids = gen.chat_prompt(messages, session.system)
    text, stopped = "", False
    try:
        for d in gen.stream(ids, cfg):
            text += d.text
            if stream and d.text:
                out.write(d.text)
                out.flush()
    except KeyboardInterrupt:
        stopped = True
    if not stream:
        out.write(text)
    out.write(" [stopped]\n" if stopped else "\n")
    out.flush()
    return text


HELP = ("commands: 'clear' empties the history, 'reset-system' sets a new system prompt, 'multi-line' / "
        "'single-line' switch input mode (multi-line input ends with '#'), 'exit' or 'quit' leaves.")


def chat_loop(session: Session, args: InferArgs, cfg: SamplingConfig) -> int:
    gen = session.generator
    context = args.max_length or gen.context_length
    history: list[dict] = []
    multi = False
    print(f"tunesmith chat — {session.lm.path}" + (f" + {', '.join(map(str, session.adapters.values()))}"
                                                   if session.adapters else ""))
    print(HELP)
    while True:
        query = _read(lambda: _read_query(multi))
        if query is _EOF:
            return 0
        if query is None:
            continue
        cmd = query.strip()
        if cmd in ("exit", "quit"):
            return 0
        if cmd == "clear":
            history = []
            print("history cleared")
            continue
        if cmd == "reset-system":
            system = _read(lambda: input("new system prompt: "))
            if system is _EOF:
                return 0
            if system is None:
                continue
            session.system = system
            history = []
            print("system prompt set; history cleared")
            continue
        if cmd in ("multi-line", "single-line"):
            multi = cmd == "multi-line"
            print("multi-line input: end with '#'" if multi else "single-line input")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": query})
        while len(gen.chat_prompt(history, session.system)) + min(cfg.max_new_tokens, 256) > context and len(history) > 1:
            history = history[2:]  # drop the oldest user/assistant pair
            print("[the oldest turn was dropped to fit the context]")
        try:
            reply = answer(session, history, cfg, args.stream)
        except UserError as e:  # e.g. one message longer than the context: say so, keep chatting
            print(f"error: {e}")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


COMMANDS = ("clear", "reset-system", "multi-line", "single-line", "exit", "quit")
_EOF = object()


def _read(read):
    """A line from `read`: None when Ctrl-C abandoned it (ask again), _EOF when the input has ended."""
    try:
        return read()
    except EOFError:
        print()
        return _EOF
    except KeyboardInterrupt:
        print()
        return None


def _read_query(multi: bool) -> str:
    """One query; in multi-line mode lines are joined until one ends with '#' (ms-swift's rule), except that a
    command alone on the first line acts at once, so 'single-line' or 'exit' need no '#'."""
    if not multi:
        return input("<<< ")
    lines = []
    while True:
        line = input("... " if lines else "<<< ")
        if not lines and line.strip() in COMMANDS:
            return line
        if line.endswith("#"):
            lines.append(line[:-1])
            return "\n".join(lines)
        lines.append(line)


def read_prompts(path: Path) -> list[dict]:
    """A prompts file: JSON list / JSONL of strings or {"prompt"|"query"|"instruction", "reference"?} rows, a CSV
    with those columns, or text lines."""
    import csv

    from tunesmith.text.tokenizer import read_json

    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file.")
    if path.suffix == ".json":
        rows = read_json(path)
    elif path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {i} is not valid JSON ({e.msg}).")
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, r in enumerate(rows, 1):
        if isinstance(r, str):
            out.append({"messages": [{"role": "user", "content": r}], "reference": None})
            continue
        q = r.get("prompt") or r.get("query") or r.get("instruction")
        if not isinstance(q, str):
            raise UserError(f"{path}: row {i} has no 'prompt' (or 'query'/'instruction') text.")
        out.append({"messages": [{"role": "user", "content": q}], "reference": r.get("reference") or r.get("response")})
    return out


def batch_infer(session: Session, args: InferArgs, cfg: SamplingConfig) -> int:
    if args.prompts:
        items = read_prompts(Path(args.prompts))
    else:
        from tunesmith.data.sources import load_dataset

        items = []
        for spec in args.val_dataset:  # in file order (not shuffled), so results line up with the dataset's rows
            for conv in load_dataset(spec, args.seed):
                last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=len(conv))
                ref = conv[last]["content"] if last < len(conv) else None
                if any(m["role"] == "user" for m in conv[:last]):
                    items.append({"messages": conv[:last], "reference": ref})
    gen = session.generator
    if args.result_path:
        out_path = Path(args.result_path)
    else:
        root = next(iter(session.adapters.values())) if session.adapters else Path("output")
        stamp = time.strftime('%Y%m%d-%H%M%S')
        out_path = root / "infer_result" / f"{stamp}.jsonl"
        n = 1
        while out_path.exists():  # two batch runs within one second
            n += 1
            out_path = root / "infer_result" / f"{stamp}-{n}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = args.max_batch_size or (16 if gen.model.lm_head_weight.device.type == "cuda" else 4)
    prompts = [gen.chat_prompt(it["messages"], session.system) for it in items]
    with open(out_path, "w", encoding="utf-8") as f:  # each answer is written (in input order) as soon as it is done
        for it, c in zip(items, gen.complete_many(prompts, cfg, rows)):
            prompt = next(m["content"] for m in reversed(it["messages"]) if m["role"] == "user")
            f.write(json.dumps({"prompt": prompt, "response": c.text, "reference": it["reference"]},
                               ensure_ascii=False) + "\n")
            f.flush()
    print(f"{len(items)} answers written to {out_path}")
    return 0
