"""`tunesmith infer`: interactive streaming chat, one `--query`, or batch answers to a dataset or a prompts file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tunesmith.args import InferArgs
from tunesmith.errors import UserError
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.session import Session, load_for_generation, sampling_from


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


def batch_infer(session: Session, args: InferArgs, cfg: SamplingConfig) -> int:
    if args.prompts:
        from tunesmith.data.prompts import read_prompts

        items = read_prompts(Path(args.prompts))
    else:
        from tunesmith.data.sources import load_dataset

        items = []
        # In file order (not shuffled), so results line up with the dataset's rows. A row may hold only the
        # question (no answer): a row ending with an assistant turn has that answer as its reference, and the
        # model answers the turns before it.
        for spec in args.val_dataset:
            for conv in load_dataset(spec, args.seed, answer=False):
                answered = conv[-1]["role"] == "assistant"
                items.append({"messages": conv[:-1] if answered else conv,
                              "reference": conv[-1]["content"] if answered else None})
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
