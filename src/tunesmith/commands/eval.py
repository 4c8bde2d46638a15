"""`tunesmith eval`: the identity + retention report (evaluate/report.py) of a fine-tuned checkpoint against its base."""

from __future__ import annotations

from pathlib import Path

from tunesmith.args import EvalArgs
from tunesmith.errors import UserError
from tunesmith.evaluate.report import Models, base_identity_terms, name_terms, run_report
from tunesmith.model.load import load_model
from tunesmith.session import load_for_generation


def evaluate(args: EvalArgs) -> int:
    session = load_for_generation(args)
    ck = session.ckpt_args
    if session.adapters:
        models = Models(session.lm, next(iter(session.adapters)))
        ckpt = next(iter(session.adapters.values()))
    elif ck.get("model") and ck.get("train_type") == "full":
        models = Models(session.lm, None, load_model(ck["model"], args.torch_dtype, session.lm.model.lm_head_weight.device))
        ckpt = Path(args.model)
    else:
        raise UserError("eval compares a fine-tuned model with its base: pass --adapters CKPT (LoRA) or --model CKPT "
                        "(a full fine-tuning checkpoint).")
    new_terms = name_terms(args.model_name or ck.get("model_name") or [], args.model_author or ck.get("model_author") or [])
    base_lm = models.use("base")
    base_terms = list(args.base_identity) or base_identity_terms(base_lm.template.default_system)
    out = Path(args.output_dir) if args.output_dir else ckpt / "eval"
    run_report(models, new_terms, base_terms, session.system, out,
               Path(args.identity_questions) if args.identity_questions else None)
    return 0
