"""`tunesmith <verb>`: sft, infer, eval, export, deploy, demo — each a plain function over its args dataclass."""

from __future__ import annotations

import argparse
import os
import sys

from tunesmith import args as A
from tunesmith.errors import UserError

COMMANDS = {
    "sft": (A.SftArgs, "fine-tune with LoRA or fully", "tunesmith.commands.sft:sft"),
    "infer": (A.InferArgs, "chat with a model or adapter (interactive, one query, or batch)", "tunesmith.commands.infer:infer"),
    "eval": (A.EvalArgs, "identity + retention report: did the new identity stick, what was lost", "tunesmith.commands.eval:evaluate"),
    "export": (A.ExportArgs, "merge LoRA into an HF folder, write GGUF", "tunesmith.commands.export:export"),
    "deploy": (A.DeployArgs, "OpenAI-compatible API server with a web chat page", "tunesmith.commands.deploy:deploy"),
    "web-ui": (A.WebUIArgs, "a studio in the browser: model, identity and data, train, check, ship", "tunesmith.commands.web_ui:web_ui"),
    "demo": (A.DemoArgs, "offline before/after identity demo on the bundled SmolLM2", "tunesmith.commands.demo:demo"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Make an open chat model your own assistant.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (cls, help_text, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        A.add_dataclass_args(sp, cls)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = parser().parse_args(argv)
    cls, _, target = COMMANDS[ns.command]
    debug = bool(getattr(ns, "debug", False)) or os.environ.get("TUNESMITH_DEBUG") == "1"
    try:
        if ns.command == "sft":
            from tunesmith.train.distributed import relaunch_under_torchrun

            relaunch_under_torchrun(argv)  # NPROC_PER_NODE=N (ms-swift's convention): exec torchrun, N copies
        args = A.build(cls, ns)
        module, func = target.split(":")
        run = getattr(__import__(module, fromlist=[func]), func)
        return run(args) or 0
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path the system refused (an --output_dir under a file, no permission, a full disk)
        if debug or e.filename is None:
            raise
        print(f"error: cannot use {e.filename} ({e.strerror}); pick another path, or pass --debug to see where "
              f"this happened.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
