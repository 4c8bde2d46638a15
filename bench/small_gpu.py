"""`tunesmith sft` with its default choices on smaller cards, simulated on a big GPU. JSON lines out.

    PYTHONPATH=src python bench/small_gpu.py --model-dir DIR [--cards 24 16 8] [--jobs tutorial long]

Each run is a fresh `python -m tunesmith sft` process whose CUDA caching allocator is capped at the card's size
(torch.cuda.set_per_process_memory_fraction) and whose `torch.cuda.mem_get_info` reports what such a card would
(free = cap - this process's reserved memory), through a sitecustomize.py this script writes; the CUDA context
is not counted. Jobs:
  tutorial  the tutorial's step 3 verbatim but for --model (the 8 rows of tests/tutorial_rows.py, 10 epochs)
  long      64 rows of 1,500-2,000 tokens with the tutorial's flags (10 epochs: ~1.1M tokens)
DIR holds a Qwen2.5-7B-Instruct config.json and tokenizer files; random bf16 weights are written into it first
when it has none (bench/infer.py's write_weights). Reports wall seconds, the mode the planner printed, peak GiB,
and the exit status (a refusal or an out-of-memory sentence is a result too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

CAP = '''
import os, torch
_limit = float(os.environ["SIM_GPU_GB"]) * 2**30
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(_limit / torch.cuda.get_device_properties(0).total_memory)
    _real = torch.cuda.mem_get_info
    def _mem_get_info(device=None):
        free, _ = _real(device)
        return max(0, min(free, int(_limit - torch.cuda.memory_reserved(device)))), int(_limit)
    torch.cuda.mem_get_info = torch.cuda.memory.mem_get_info = _mem_get_info
'''


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def long_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """n alpaca rows whose answers make 1,500-2,000-token samples (Qwen2.5 tokenizer: ~1 token per word here)."""
    rng = random.Random(seed)
    words = "the model learns who it is and what it can do while it keeps what it knew before".split()
    rows = []
    for i in range(n):
        size = rng.randint(1450, 1950)
        rows.append({"instruction": f"Write note {i}.", "input": "",
                     "output": " ".join(rng.choice(words) for _ in range(size))})
    return rows


def main() -> int:
    from seed_job import TUTORIAL_FLAGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--cards", type=float, nargs="+", default=[24, 16, 8])
    ap.add_argument("--jobs", nargs="+", default=["tutorial", "long"])
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("extra", nargs="*", help="more sft flags after --")
    a = ap.parse_args()
    from infer import warm_page_cache, write_weights  # bench/infer.py
    from tests.tutorial_rows import TUTORIAL_ROWS

    if not list(a.model_dir.glob("*.safetensors")):
        write_weights(a.model_dir, 28)
    warm_page_cache(a.model_dir)
    with tempfile.TemporaryDirectory() as site:
        Path(site, "sitecustomize.py").write_text(CAP)
        for job in a.jobs:
            for gb in a.cards:
                with tempfile.TemporaryDirectory() as work:
                    rows = TUTORIAL_ROWS if job == "tutorial" else long_rows()
                    Path(work, "self_cognition.json").write_text(json.dumps(rows, ensure_ascii=False))
                    flags = list(TUTORIAL_FLAGS)
                    env = dict(os.environ, SIM_GPU_GB=str(gb),
                               PYTHONPATH=os.pathsep.join([site, str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
                    cmd = [sys.executable, "-m", "tunesmith", "sft", "--model", str(a.model_dir.resolve()), *flags,
                           *a.extra]
                    t0 = time.perf_counter()
                    try:
                        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                                              timeout=a.timeout)
                    except subprocess.TimeoutExpired:
                        emit({"job": job, "card_gib": gb, "error": f"timed out after {a.timeout} s"})
                        continue
                    wall = time.perf_counter() - t0
                    plan = next((line for line in proc.stderr.splitlines() if line.startswith("plan:")), None)
                    rec = {"job": job, "card_gib": gb, "rc": proc.returncode, "wall_s": round(wall, 1), "plan": plan}
                    runs = sorted(Path(work, "output").glob("v*"))
                    if proc.returncode == 0 and runs:
                        summary = json.loads((runs[-1] / "summary.json").read_text())
                        rec.update(steps=summary["steps"], train_s=summary["seconds"],
                                   peak_gib=round(summary["peak_memory_gib"], 2),
                                   final_loss=round(summary["final_loss"], 4))
                    else:
                        rec["stderr_tail"] = proc.stderr.strip().splitlines()[-3:]
                    emit(rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
