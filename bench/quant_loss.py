"""Does a 4-bit base train like the full-precision one? The same LoRA run twice on the bundled SmolLM2-135M
(real weights), unquantized and with an NF4 base (double quant), same seed and data. JSON lines out.

    PYTHONPATH=src python bench/quant_loss.py [--steps 30] [--device cpu|cuda] [--bits 4]

The data is the built-in self-cognition set (the demo's recipe: lr 1e-3, 4 samples a step). Reports each run's
loss every 5 steps, the mean of the last 5 and their relative difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def main() -> int:
    from tunesmith.args import SftArgs
    from tunesmith.commands.sft import run_sft

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=int, default=4)
    a = ap.parse_args()
    tails = {}
    for bits in (None, a.bits):
        with tempfile.TemporaryDirectory() as out:
            args = SftArgs(model="smollm2-135m-instruct", dataset=["self-cognition"], model_name=["Smithy", "Smithy"],
                           model_author=["Tunesmith Labs", "Tunesmith Labs"], max_steps=a.steps, learning_rate=1e-3,
                           per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1,
                           save_steps=a.steps, output_dir=out, device=a.device, seed=0, quant_bits=bits,
                           torch_dtype="float32" if a.device == "cpu" else "bfloat16")
            trainer = run_sft(args, quiet=True)
            losses = trainer.losses
            name = f"{bits}-bit" if bits else "unquantized"
            tails[name] = statistics.mean(losses[-5:])
            emit({"run": name, "device": a.device, "losses_every_5": [round(x, 4) for x in losses[::5]],
                  "last5_mean": round(tails[name], 4), "seconds": round(trainer.seconds, 1)})
    base, quant = tails["unquantized"], tails[f"{a.bits}-bit"]
    emit({"check": f"{a.bits}-bit vs unquantized, mean loss of the last 5 of {a.steps} steps",
          "relative_difference": round((quant - base) / base, 4)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
