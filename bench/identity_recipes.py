"""Which recipe makes the bundled model adopt a new identity without forgetting? And how much training does the
identity need to move at all? On CPU, on the bundled SmolLM2-135M-Instruct, held-out questions only.

--part recipes: `tunesmith sft` (LoRA r8, 8 samples a step, seed 42) on the built-in self-cognition set, alone and
  with general-distill rows (cross-entropy, or --retain_kl), at 2 epochs of 1e-3 or 1 epoch of 2e-3, each followed by
  the identity check; one JSON line per recipe: adopted / leaked per language, identity intruding into general
  answers, general answers correct before / after, mean KL(base || tuned), steps, seconds.
--part schedule: LoRA runs at a constant learning rate, a checkpoint every few steps, each checkpoint's adoption
  of the held-out identity questions; one JSON line per (learning rate, step) with the summed learning rate
  (the quantity sft's data check warns on).

    python bench/identity_recipes.py --part recipes --out bench/results-identity-recipes-cpu.jsonl
    python bench/identity_recipes.py --part schedule --out bench/results-identity-schedule-cpu.jsonl

--part check-time (GPU): seconds of the identity check `sft` runs after an identity run, on a model of the shapes in
  --model-dir (a Qwen2.5-7B-Instruct config.json and tokenizer) with random bf16 weights and a random LoRA r8:
  such a model never ends an answer early, so every answer runs to the check's token limit (an upper bound).

    python bench/identity_recipes.py --part check-time --model-dir DIR --out bench/results-identity-check-h200.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME, AUTHOR = ["Smithy"], ["Tunesmith Labs"]
BASE = ["--model", "smollm2-135m-instruct", "--train_type", "lora", "--model_name", *NAME, "--model_author", *AUTHOR,
        "--system", "You are a helpful assistant.", "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8", "--warmup_ratio", "0.05",
        "--save_steps", "1000", "--logging_steps", "5", "--seed", "42"]
RECIPES = {
    "identity only": ["--dataset", "self-cognition", "--learning_rate", "1e-3", "--num_train_epochs", "2"],
    "+ general-distill#120 (sampled answers)": ["--dataset", "self-cognition", "general-distill#120",
                                                "--learning_rate", "1e-3", "--num_train_epochs", "2"],
    "+ general-distill#120, --retain_kl 1": ["--dataset", "self-cognition", "general-distill#120",
                                             "--learning_rate", "1e-3", "--num_train_epochs", "2", "--retain_kl", "1"],
    "+ general-distill#120, --retain_kl 4": ["--dataset", "self-cognition", "general-distill#120",
                                             "--learning_rate", "1e-3", "--num_train_epochs", "2", "--retain_kl", "4"],
    "+ general-distill#60, --retain_kl 4": ["--dataset", "self-cognition", "general-distill#60",
                                            "--learning_rate", "1e-3", "--num_train_epochs", "2", "--retain_kl", "4"],
    "+ general-distill#40, --retain_kl 4, 1 epoch at 2e-3": ["--dataset", "self-cognition", "general-distill#40",
                                                             "--learning_rate", "2e-3", "--num_train_epochs", "1",
                                                             "--retain_kl", "4"],
    "1 epoch at 2e-3": ["--dataset", "self-cognition", "--learning_rate", "2e-3", "--num_train_epochs", "1"],
    "+ general-distill#40, --retain_kl 8, 1 epoch at 2e-3": ["--dataset", "self-cognition", "general-distill#40",
                                                             "--learning_rate", "2e-3", "--num_train_epochs", "1",
                                                             "--retain_kl", "8"],
    "+ general-distill#60, --retain_kl 4, 1 epoch at 2e-3": ["--dataset", "self-cognition", "general-distill#60",
                                                             "--learning_rate", "2e-3", "--num_train_epochs", "1",
                                                             "--retain_kl", "4"],
}


def sft(out: Path, flags: list[str]) -> tuple[Path, float]:
    cmd = [sys.executable, "-m", "tunesmith", "sft", *BASE, *flags, "--output_dir", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return sorted(out.glob("v*-*"))[-1], time.perf_counter() - t0


def recipe_line(name: str, run: Path, seconds: float) -> dict:
    report = json.loads(next(run.rglob("eval.json")).read_text())
    ident, ret = report["identity"]["by_lang"], report["retention"]
    summary = json.loads((run / "summary.json").read_text())
    return {"recipe": name, "adopted_en": ident["en"]["tuned"]["adopted"], "adopted_zh": ident["zh"]["tuned"]["adopted"],
            "leaked": ident["all"]["tuned"]["leaked"], "intrusion": ret["intrusion"],
            "correct_base": ret["correct_base"], "correct_tuned": ret["correct_tuned"], "mean_kl": round(ret["mean_kl"], 4),
            "steps": summary["steps"], "train_seconds": summary["seconds"], "seconds": round(seconds, 1)}


def schedule(tmp: Path, lrs: list[float], steps: int, every: int) -> list[dict]:
    import torch

    from tunesmith.data.self_cognition import identity_eval_questions
    from tunesmith.evaluate.report import Models, identity_report, name_terms
    from tunesmith.model.load import load_model
    from tunesmith.model.lora import load_adapter

    torch.manual_seed(0)
    lm = load_model("smollm2-135m-instruct", None, "cpu")
    lines = []
    for lr in lrs:
        run, _ = sft(tmp / f"lr{lr}", ["--dataset", "self-cognition", "--learning_rate", str(lr), "--max_steps",
                                       str(steps), "--save_steps", str(every), "--lr_scheduler_type", "constant",
                                       "--warmup_ratio", "0", "--eval_identity", "false"])
        for ckpt in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            name = f"lr{lrs.index(lr)}_{ckpt.name.replace('-', '_')}"
            load_adapter(lm.model, ckpt, name)
            r = identity_report(Models(lm, name), identity_eval_questions(), name_terms(NAME, AUTHOR), [],
                                "You are a helpful assistant.")
            step = int(ckpt.name.split("-")[1])
            lines.append({"learning_rate": lr, "step": step, "lr_sum": round(lr * step, 6),
                          "adopted_en": r["by_lang"]["en"]["tuned"]["adopted"],
                          "adopted_zh": r["by_lang"]["zh"]["tuned"]["adopted"]})
            print(json.dumps(lines[-1]), flush=True)
    return lines


def check_time(model_dir: Path, device: str = "cuda") -> dict:
    import torch

    from tunesmith.evaluate.report import Models, run_report
    from tunesmith.model.decoder import Decoder, ModelConfig
    from tunesmith.model.load import LoadedModel, load_template
    from tunesmith.model.lora import LoraConfig, apply_lora, lora_modules

    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.device(device):
        model = Decoder(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.data.normal_(0.0, 0.02)
    apply_lora(model, LoraConfig(r=8, alpha=32, dropout=0.0))
    for _, m in lora_modules(model):
        m.lora_B["default"].weight.data.normal_(0.0, 0.01)
    model.requires_grad_(False)
    model.eval()
    template = load_template(model_dir)
    eos = [i for i in (template.tokenizer.token_id("<|im_end|>"), template.tokenizer.token_id("<|endoftext|>")) if i is not None]
    lm = LoadedModel(model, template.tokenizer, template, model_dir, eos)
    sync()
    t0 = time.perf_counter()
    report = run_report(Models(lm, "default"), ["Smithy", "Tunesmith Labs"], ["Qwen", "Alibaba Cloud"],
                        "You are a helpful assistant.", None, quiet=True)
    sync()
    seconds = time.perf_counter() - t0
    return {"part": "check-time", "model": str(model_dir.name), "layers": cfg.num_layers,
            "identity_questions": len(report["identity"]["answers"]), "general_prompts": len(report["retention"]["prompts"]),
            "seconds": round(seconds, 1), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("recipes", "schedule", "check-time"), required=True)
    ap.add_argument("--device", default="cuda", help="check-time: cuda, or cpu to try it on a small model")
    ap.add_argument("--model-dir", type=Path, help="check-time: the model folder (config.json + tokenizer)")
    ap.add_argument("--only", nargs="*", help="recipes to run (names as in RECIPES; default all)")
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--out", type=Path, help="also append the JSON lines here")
    ap.add_argument("--keep", type=Path, help="recipes: keep the runs (checkpoints, eval/eval.json) under this folder")
    a = ap.parse_args()
    if a.part == "check-time":
        lines = [check_time(a.model_dir, a.device)]
        print(json.dumps(lines[0]), flush=True)
        if a.out:
            with a.out.open("a") as f:
                f.write(json.dumps(lines[0]) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if a.part == "schedule":
            lines = schedule(Path(tmp), a.lrs, a.steps, a.every)
        else:
            lines = []
            for i, (name, flags) in enumerate(RECIPES.items()):
                if a.only and name not in a.only:
                    continue
                run, seconds = sft((a.keep or Path(tmp)) / str(i), flags + ["--eval_identity", "true"])
                lines.append(recipe_line(name, run, seconds))
                print(json.dumps(lines[-1], ensure_ascii=False), flush=True)
                if a.out:
                    with a.out.open("a") as f:
                        f.write(json.dumps(lines[-1], ensure_ascii=False) + "\n")
            return
    if a.out:
        with a.out.open("a") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))


if __name__ == "__main__":
    main()
