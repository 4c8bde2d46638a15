"""The studio's pre-flight estimate (tunesmith/studio/estimate.py) against the run it estimates: the probe, then the
real `tunesmith sft` with the same flags, each in a process of its own; one JSON line per case.

    PYTHONPATH=src python bench/studio_estimate.py [--cases short long check] [--device cpu|cuda] [--model M]

time: the estimate's seconds vs the sft process's wall seconds (start to exit); memory: the estimate's GiB vs the
peak_memory_gib the run writes to summary.json (CPU: the process's peak resident memory; GPU: the allocator's
peak). On a GPU pass --model with a real model folder (the bundled 135M model is too small to say much there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IDENTITY = ["--dataset", "self-cognition", "--model_name", "小诺", "Nova", "--model_author", "星辰实验室", "Star Lab"]
CASES = {
    # training only: start to last checkpoint
    "short": [*IDENTITY, "--max_steps", "20", "--gradient_accumulation_steps", "4", "--max_length", "512",
              "--save_steps", "10", "--eval_identity", "false"],
    "long": [*IDENTITY, "--num_train_epochs", "1", "--gradient_accumulation_steps", "8", "--max_length", "1024",
             "--save_steps", "5", "--split_dataset_ratio", "0.1", "--eval_identity", "false"],
    # the quick-identity preset's schedule, shortened, with the identity check after training
    "check": [*IDENTITY, "--max_steps", "10", "--gradient_accumulation_steps", "8", "--learning_rate", "1e-3",
              "--save_steps", "10"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["short", "long", "check"], choices=list(CASES))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for case in a.cases:
        with tempfile.TemporaryDirectory() as tmp:
            flags = ["--model", a.model, *CASES[case], "--output_dir", f"{tmp}/out"]
            if a.device:
                flags += ["--device", a.device]
            est_file = Path(tmp) / "estimate.json"
            t = time.time()
            subprocess.run([sys.executable, "-m", "tunesmith.studio.estimate", str(est_file), "--", *flags], env=env,
                           check=True, capture_output=True, text=True, cwd=tmp)
            probe_s = time.time() - t
            est = json.loads(est_file.read_text())
            t = time.time()
            subprocess.run([sys.executable, "-m", "tunesmith", "sft", *flags], env=env, check=True,
                           capture_output=True, text=True, cwd=tmp)
            wall = time.time() - t
            summary = json.loads(next(Path(tmp, "out").glob("v*/summary.json")).read_text())
            print(json.dumps({
                "case": case, "device": est["device_name"], "steps": est["steps"], "mode": est["mode"],
                "estimated_s": est["seconds"], "measured_s": round(wall, 1),
                "time_error": round(est["seconds"] / wall - 1, 3),
                "estimated_gib": est["memory_gib"], "measured_gib": summary["peak_memory_gib"],
                "memory_error": round(est["memory_gib"] / summary["peak_memory_gib"] - 1, 3),
                "probe_s": round(probe_s, 1), "parts_s": est["parts_s"], "modes_gib": est["modes_gib"],
                "flags": " ".join(CASES[case]), "date": time.strftime("%Y-%m-%d")}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
