"""The `tunesmith sft` command line the Train page shows and runs: presets, every sft flag for the custom form, and
the rendering of the page's values as argv (checked by the CLI's own parser and bounds before anything starts)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shlex

from tunesmith import args as A
from tunesmith.args import RECIPES
from tunesmith.errors import UserError

# The presets: the recipes measured on the bundled model (args.RECIPES), saving every 10 steps for resume.
PRESETS = {
    "quick": dict(RECIPES["identity"], logging_steps=1, save_steps=10, max_length=512),
    "balanced": dict(RECIPES["balanced"], logging_steps=1, save_steps=10, max_length=1024),
}
ALWAYS = ("model", "dataset")  # shown even when equal to the default
HIDDEN = ("dry_run", "report_to", "dataloader_num_workers", "model_type")  # no use on the page


def field_kind(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else str(f.type)
    if f.metadata.get("nargs"):
        return "list"
    for kind in ("bool", "int", "float"):
        if kind in t:
            return kind
    return "str"


def sft_fields() -> list[dict]:
    """Every sft flag for the custom form: name (the --flag), kind, default, choices and the CLI's help."""
    out = []
    for f in dataclasses.fields(A.SftArgs):
        if f.name in HIDDEN:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append({"name": f.name, "kind": field_kind(f), "default": default,
                    "choices": list(f.metadata.get("choices") or []) or None, "help": f.metadata.get("help", "")})
    return out


def text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value)) if value != 0 else "0"
    return str(value)


def render(flags: dict) -> list[str]:
    """The page's values as `tunesmith sft` argv: the flags that differ from the CLI's defaults (and ALWAYS), in
    the dataclass's order; lists as several values. Unknown names are refused."""
    fields = {f.name: f for f in dataclasses.fields(A.SftArgs)}
    unknown = [k for k in flags if k not in fields]
    if unknown:
        raise UserError(f"unknown sft flag --{unknown[0]}; the flags are those of `tunesmith sft --help`.")
    argv = ["tunesmith", "sft"]
    for name, f in fields.items():
        if name not in flags:
            continue
        value = flags[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value is None or value == "" or (value == default and name not in ALWAYS):
            continue
        if field_kind(f) == "list":
            values = [v for v in (value if isinstance(value, list) else str(value).split()) if str(v).strip()]
            if not values or (values == list(default) and name not in ALWAYS):
                continue
            argv += [f"--{name}", *(text(v) for v in values)]
        else:
            argv += [f"--{name}", text(value)]
    return argv


def parse(argv: list[str]) -> A.SftArgs:
    """argv as the CLI parses and checks it (types, choices, bounds); its complaint becomes one UserError."""
    from tunesmith.cli import parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser().parse_args(argv[1:])
    except SystemExit:
        last = (err.getvalue().strip().splitlines() or ["invalid flags"])[-1]
        raise UserError(last.split("error: ", 1)[-1].rstrip(".") + "; fix that value on the Train page.") from None
    return A.build(A.SftArgs, ns)


def display(argv: list[str]) -> str:
    return shlex.join(argv)
