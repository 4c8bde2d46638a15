"""The identity + retention report (`tunesmith eval`, `sft --eval_identity`): did the new identity stick, and what
general behaviour was lost?

Identity: held-out identity questions (phrased unlike the training rows; Chinese and English; plus the user's
own with --identity_questions) are answered greedily by the base and the tuned model.
  adopted = the answer names the new name or author;
  leaked  = the answer names the base identity (name/maker from the base's default system prompt, or
            --base_identity) and not the new one.
Retention: built-in general prompts (facts, arithmetic, code, translation, advice; zh + en).
  kl        = mean per-token KL(base || tuned) of next-token distributions along the base model's own answers;
  retained  = share of prompts whose tuned greedy answer equals the base's, or still contains a correct answer;
  intrusion = share of prompts whose tuned answer names the new identity where the base's did not.
Both models are one set of weights: the base is the tuned model with its adapter switched off.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.errors import UserError
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import LoadedModel
from tunesmith.model.lora import set_active_adapter
from tunesmith.progress import Progress

IDENTITY_TOKENS = 48
RETENTION_TOKENS = 48
BATCH = 16


@dataclass
class Models:
    """How to switch between base and tuned on one loaded model."""

    lm: LoadedModel
    adapter: str | None  # adapter name for the tuned model (None: lm itself is the tuned model)
    base_lm: LoadedModel | None = None  # a separate base for full fine-tunes

    def use(self, which: str) -> LoadedModel:
        if self.adapter is not None:
            set_active_adapter(self.lm.model, None if which == "base" else self.adapter)
            return self.lm
        return self.base_lm if which == "base" else self.lm


def base_identity_terms(default_system: str | None) -> list[str]:
    """Names and makers in a default system prompt: 'You are Qwen, created by Alibaba Cloud.' -> Qwen, Alibaba Cloud."""
    if not default_system:
        return []
    terms = []
    pats = [r"\bnamed\s+([A-Z][\w\-.]*)", r"\bYou are\s+([A-Z][\w\-.]*)\s*,",
            r"\b(?:created|trained|developed|made|built)\s+by\s+([A-Z][\w\-]*(?:\s+[A-Z][\w\-]*)*)"]
    for p in pats:
        terms += [m.group(1).strip(" .") for m in re.finditer(p, default_system)]
    if any(t.lower().startswith("qwen") for t in terms):
        terms += ["通义千问", "阿里"]
    return sorted(set(t for t in terms if t))


def mentions(text: str, terms: list[str]) -> bool:
    low = text.lower()
    return any(t and t.lower() in low for t in terms)


def batched_answers(lm: LoadedModel, prompts: list[list[dict]], system: str | None, max_new: int,
                    bar: Progress | None = None, detail: str = "") -> list[str]:
    gen = Generator(lm)
    ids = [gen.chat_prompt(m, system) for m in prompts]
    cfg = SamplingConfig(max_new_tokens=max_new, temperature=0.0)
    return [c.text for c in _tracked(bar, gen.complete_many(ids, cfg, rows=BATCH), detail)]


def _tracked(bar: Progress | None, items, detail: str):
    return items if bar is None else bar.track(items, detail)


def identity_report(models: Models, questions: list[dict], new_terms: list[str], base_terms: list[str],
                    system: str | None, bar: Progress | None = None) -> dict:
    msgs = [[{"role": "user", "content": q["question"]}] for q in questions]
    result = {"new_identity": new_terms, "base_identity": base_terms, "by_lang": {}, "answers": []}
    answers = {w: batched_answers(models.use(w), msgs, system, IDENTITY_TOKENS, bar, f"identity questions ({w})")
               for w in ("base", "tuned")}
    for i, q in enumerate(questions):
        row = {"question": q["question"], "lang": q.get("lang", "en")}
        for w in ("base", "tuned"):
            a = answers[w][i]
            adopted = mentions(a, new_terms)
            row[w] = {"answer": a, "adopted": adopted, "leaked": mentions(a, base_terms) and not adopted}
        result["answers"].append(row)
    for lang in sorted({r["lang"] for r in result["answers"]}) + ["all"]:
        rows = [r for r in result["answers"] if lang == "all" or r["lang"] == lang]
        result["by_lang"][lang] = {
            w: {"adopted": sum(r[w]["adopted"] for r in rows) / len(rows),
                "leaked": sum(r[w]["leaked"] for r in rows) / len(rows), "n": len(rows)}
            for w in ("base", "tuned")}
    return result


def retention_report(models: Models, prompts: list[dict], system: str | None, new_terms: list[str] = (),
                     bar: Progress | None = None) -> dict:
    msgs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    base_lm = models.use("base")
    gen = Generator(base_lm)
    prompt_ids = [gen.chat_prompt(m, system) for m in msgs]
    cfg = SamplingConfig(max_new_tokens=RETENTION_TOKENS, temperature=0.0)
    base_out = list(_tracked(bar, gen.complete_many(prompt_ids, cfg, rows=BATCH), "general prompts (base)"))
    # KL needs both models at once: with one adapter-switched model, score base then tuned per prompt.
    kls = []
    for p_ids, c in _tracked(bar, zip(prompt_ids, base_out), "KL(base||tuned)"):
        kls.append(_kl_switched(models, p_ids, c.token_ids))
    tuned_lm = models.use("tuned")
    tgen = Generator(tuned_lm)
    tuned_out = list(_tracked(bar, tgen.complete_many(prompt_ids, cfg, rows=BATCH), "general prompts (tuned)"))
    rows = []
    for p, b, t, kl in zip(prompts, base_out, tuned_out, kls):
        answers = p.get("answer") or []
        correct = (lambda s: any(a.lower() in s.lower() for a in answers)) if answers else None
        rows.append({"prompt": p["prompt"], "lang": p.get("lang"), "kl": kl, "base": b.text, "tuned": t.text,
                     "unchanged": b.text.strip() == t.text.strip(),
                     "base_correct": correct(b.text) if correct else None,
                     "tuned_correct": correct(t.text) if correct else None,
                     "intrusion": mentions(t.text, new_terms) and not mentions(b.text, new_terms)})
    for r in rows:
        r["retained"] = r["unchanged"] or bool(r["tuned_correct"])
    checkable = [r for r in rows if r["tuned_correct"] is not None]
    return {
        "mean_kl": sum(kls) / len(kls),
        "retained": sum(r["retained"] for r in rows) / len(rows),
        "unchanged": sum(r["unchanged"] for r in rows) / len(rows),
        "intrusion": sum(r["intrusion"] for r in rows) / len(rows),
        "correct_base": sum(bool(r["base_correct"]) for r in checkable) / max(len(checkable), 1),
        "correct_tuned": sum(bool(r["tuned_correct"]) for r in checkable) / max(len(checkable), 1),
        "worst": sorted(rows, key=lambda r: -r["kl"])[:3],
        "prompts": rows,
    }


@torch.inference_mode()
def _kl_switched(models: Models, prompt_ids: list[int], answer_ids: list[int]) -> float:
    if not answer_ids:
        return 0.0
    logps = []
    for which in ("base", "tuned"):
        lm = models.use(which)
        ids = torch.tensor([prompt_ids + answer_ids], device=lm.model.lm_head_weight.device)
        start = len(prompt_ids) - 1
        h = lm.model(ids)[0, start : start + len(answer_ids)]
        logps.append(F.log_softmax(lm.model.logits(h).float(), -1))
    return float(F.kl_div(logps[1], logps[0], log_target=True, reduction="none").sum(-1).mean())


def read_questions(path: Path) -> list[dict]:
    from tunesmith.data.prompts import read_prompts

    return [{"question": r["messages"][-1]["content"], "lang": _lang(r["messages"][-1]["content"])}
            for r in read_prompts(path)]


def _lang(text: str) -> str:
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def name_terms(model_name: list[str], model_author: list[str]) -> list[str]:
    return sorted({t for t in list(model_name) + list(model_author) if t})


def write_outputs(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2))
    plot(report, out_dir / "eval.png")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ident = report["identity"]["by_lang"]["all"]
    labels = ["adopted", "leaked", "retained"]
    base = [ident["base"]["adopted"], ident["base"]["leaked"], 1.0]
    tuned = [ident["tuned"]["adopted"], ident["tuned"]["leaked"], report["retention"]["retained"]]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], base, 0.4, label="base", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], tuned, 0.4, label="tuned", color="#2f80ed")
    ax.set_xticks(list(x), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of prompts")
    ax.set_title(f"identity and retention (mean KL {report['retention']['mean_kl']:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(report: dict) -> str:
    lines = ["", "identity                     base     tuned"]
    for lang, v in report["identity"]["by_lang"].items():
        lines.append(f"  adopted ({lang:>3}, n={v['base']['n']:>2})      {v['base']['adopted']:6.0%}   {v['tuned']['adopted']:6.0%}")
        lines.append(f"  leaked  ({lang:>3})            {v['base']['leaked']:6.0%}   {v['tuned']['leaked']:6.0%}")
    r = report["retention"]
    lines += ["retention",
              f"  mean KL(base||tuned) per token   {r['mean_kl']:.4f}",
              f"  unchanged or still correct       {r['retained']:.0%}  (unchanged {r['unchanged']:.0%}; "
              f"correct {r['correct_base']:.0%} -> {r['correct_tuned']:.0%})",
              f"  identity in general answers      {r['intrusion']:.0%}",
              "  worst cases:"]
    for w in r["worst"]:
        lines.append(f"    KL {w['kl']:.3f}  {w['prompt'][:50]!r} -> {w['tuned'][:60]!r}")
    return "\n".join(lines)


def run_report(models: Models, new_terms: list[str], base_terms: list[str], system: str | None,
               out_dir: Path | None, extra_questions: Path | None = None, quiet: bool = False) -> dict:
    from tunesmith.data.self_cognition import general_prompts, identity_eval_questions

    if not new_terms:
        raise UserError("the new identity is unknown: pass --model_name (and --model_author), or evaluate a "
                        "checkpoint trained with them.")
    questions = identity_eval_questions() + (read_questions(extra_questions) if extra_questions else [])
    general = general_prompts()
    bar = Progress("Check", 2 * len(questions) + 3 * len(general), quiet)
    try:
        report = {"identity": identity_report(models, questions, new_terms, base_terms, system, bar),
                  "retention": retention_report(models, general, system, new_terms, bar), "system": system}
    finally:
        bar.end_line()
    models.use("tuned")
    if out_dir is not None:
        write_outputs(report, out_dir)
    if not quiet:
        print(format_table(report))
        if out_dir is not None:
            print(f"\nreport: {out_dir / 'eval.json'}  plot: {out_dir / 'eval.png'}")
    return report


def report_for_checkpoint(ckpt: Path, out_dir: Path, lm: LoadedModel, quiet: bool = False) -> dict:
    """The check `sft` runs after an identity run: the model in memory carries the adapter just trained."""
    from tunesmith.runs import read_checkpoint_args

    ck = read_checkpoint_args(ckpt)
    models = Models(lm, "default")
    new_terms = name_terms(ck.get("model_name") or [], ck.get("model_author") or [])
    set_active_adapter(lm.model, None)
    base_terms = base_identity_terms(lm.template.default_system)
    set_active_adapter(lm.model, "default")
    lm.model.eval()
    if not quiet:
        print("", file=sys.stderr)
    return run_report(models, new_terms, base_terms, ck.get("system"), out_dir, quiet=quiet)


# What a recommended run reaches on the bundled model (bench/identity_recipes.py; bench/RESULTS.md)
ADOPTED, LEAKED, INTRUSION, KL, CORRECT_DROP = 0.9, 0.02, 0.02, 0.05, 0.05


def advice(report: dict, ck: dict, lr_sum: float | None = None) -> list[str]:
    """One line per way the check fell short, naming the flags to change, from what this run (its args `ck`) did."""
    from tunesmith.data.check import IDENTITY_LR_SUM

    ident, ret = report["identity"]["by_lang"], report["retention"]
    langs = {k: v["tuned"] for k, v in ident.items() if k != "all"}
    out = []
    low = {k: v["adopted"] for k, v in langs.items() if v["adopted"] < ADOPTED}
    if low or ident["all"]["tuned"]["leaked"] > LEAKED:
        shares = ", ".join(f"{k} {v['adopted']:.0%}" for k, v in langs.items())
        more = max(2.0, IDENTITY_LR_SUM / lr_sum) if lr_sum else 2.0
        if (ck.get("max_steps") or 0) > 0:
            longer = f"--max_steps {math.ceil(ck['max_steps'] * more)}"
        else:
            longer = f"--num_train_epochs {math.ceil((ck.get('num_train_epochs') or 1) * more)}"
        out.append(f"advice: the identity did not stick everywhere (adopted {shares}; leaked "
                   f"{ident['all']['tuned']['leaked']:.0%})" + (f": this run's learning rate summed to {lr_sum:.2g}" if lr_sum else "")
                   + f"; train longer, e.g. {longer}, or raise --learning_rate.")
    forgot = (ret["intrusion"] > INTRUSION or ret["mean_kl"] > KL
              or ret["correct_tuned"] < ret["correct_base"] - CORRECT_DROP)
    if forgot:
        what = (f"identity in {ret['intrusion']:.0%} of general answers, mean KL {ret['mean_kl']:.3f}, correct "
                f"{ret['correct_base']:.0%} -> {ret['correct_tuned']:.0%}")
        datasets = ck.get("dataset") or []
        if not any(str(d).startswith("general-distill") for d in datasets):
            fix = "add --dataset general-distill#40 --retain_kl 8 (general answers of the base model, kept close to it)"
        elif not ck.get("retain_kl"):
            fix = "add --retain_kl 8 (the general-distill rows then keep the base's whole distributions)"
        else:
            fix = f"raise --retain_kl above {ck['retain_kl']:g} or lower --learning_rate"
        out.append(f"advice: general answers moved ({what}); {fix}.")
    return out
