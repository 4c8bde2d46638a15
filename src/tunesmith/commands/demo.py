"""`tunesmith demo`: the whole job, offline, on CPU, in a few minutes, on the bundled SmolLM2-135M-Instruct.

  1. the base model answers "Who are you?" / "你是谁？" (it says it is SmolLM, or something generic);
  2. LoRA fine-tuning on the built-in self-cognition data, filled with the name and author given, beside general
     answers sampled from the base itself and trained towards its distributions (args.RECIPES["balanced"]);
  3. the same questions again, then the identity + retention check on held-out questions (sft's check).

The recipe was measured on the bundled 135M model on 2 CPU cores (bench/RESULTS.md); the tutorial's commands keep
ms-swift's defaults.
"""

from __future__ import annotations

import sys

from tunesmith.args import RECIPES, DemoArgs, SftArgs
from tunesmith.commands.sft import identity_check, run_sft
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.load import load_model, pick_device
from tunesmith.model.lora import set_active_adapter
from tunesmith.train.loop import schedule

SYSTEM = "You are a helpful assistant."
QUESTIONS = ["Who are you?", "你是谁？"]
DEMO_RECIPE = dict(RECIPES["balanced"], logging_steps=5, save_steps=1000)


def ask(lm, system: str) -> list[str]:
    gen = Generator(lm)
    ids = [gen.chat_prompt([{"role": "user", "content": q}], system) for q in QUESTIONS]
    return [c.text.strip() for c in gen.complete_many(ids, SamplingConfig(max_new_tokens=48, temperature=0.0))]


def show(title: str, answers: list[str]) -> None:
    print(f"\n== {title}")
    for q, a in zip(QUESTIONS, answers):
        print(f"  Q: {q}\n  A: {a}")


def demo(args: DemoArgs) -> int:
    name = list(args.model_name) or ["Smithy"]
    author = list(args.model_author) or ["Tunesmith Labs"]
    model = args.model or "smollm2-135m-instruct"
    device = pick_device(args.device)
    print(f"tunesmith demo: teaching {model} that it is {' / '.join(name)} by {' / '.join(author)}", flush=True)
    lm = load_model(model, args.torch_dtype, device)
    show("before fine-tuning", ask(lm, SYSTEM))
    recipe = dict(DEMO_RECIPE, dataset=list(args.dataset) or DEMO_RECIPE["dataset"])
    if not any(d.split("#")[0] == "general-distill" for d in recipe["dataset"]):
        recipe["retain_kl"] = 0.0  # --retain_kl applies to general-distill rows only
    sft_args = SftArgs(model=model, model_name=name, model_author=author, system=SYSTEM, output_dir=args.output_dir,
                       seed=args.seed, device=str(device), torch_dtype=args.torch_dtype, max_steps=args.max_steps,
                       eval_identity=False, **recipe)
    kl = f", --retain_kl {sft_args.retain_kl:g}" if sft_args.retain_kl else ""
    print(f"\n== fine-tuning (LoRA r{sft_args.lora_rank}, {' + '.join(sft_args.dataset)}{kl})", flush=True)
    trainer = run_sft(sft_args, lm=lm)
    set_active_adapter(lm.model, "default")
    lm.model.eval()
    show("after fine-tuning", ask(lm, SYSTEM))
    last = trainer.last_checkpoint
    report = identity_check(trainer, last, schedule(trainer.args, len(trainer.train_samples)).lr_sum, quiet=False)
    run = trainer.run_dir
    print(f"\nadapter:  {last}\nlogs:     {run / 'logging.jsonl'} (TensorBoard: {run / 'runs'})"
          f"\nplots:    {run / 'loss.png'}  {last / 'eval' / 'eval.png'}"
          f"\nchat:     tunesmith infer --adapters {last} --temperature 0")
    print(f"demo time: training {trainer.seconds:.0f} s", file=sys.stderr)
    return 0 if report else 1
