"""The tutorial's seed job, wall clock: `tunesmith sft` as the tutorial's step 3 writes it, load -> adapter saved.

    PYTHONPATH=src python bench/seed_job.py --model-dir DIR [--repeat 2] [-- extra sft flags]

DIR holds a Qwen2.5-7B-Instruct config.json and tokenizer files (from any Qwen2.5-7B-Instruct download; the
tokenizer files can also come from tests/qwen25_tiny.py's builder, which writes the same ones);
random bf16 weights are written into it first when it has none. The 8 rows of the tutorial's
self_cognition.json (tests/tutorial_rows.py), 10 epochs, so 10 optimizer steps of 8 short rows. Each run is a
fresh process (imports, CUDA start, load, training, saving all count), page cache warm, and Python's bytecode
cache warm: one untimed run first, with compiled modules kept under PYTHONPYCACHEPREFIX (an installed package has
its .pyc files; the GPU image's site-packages are read-only without them, and compiling ~1,100 modules from source
took ~3 s of every run there, 2026-12-01). JSON lines out.
ms-swift 4.6 on the same H200, same shapes and flags: 90.7 s wall, 10 steps in 30.1 s, 14.7 GiB reserved.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

TUTORIAL_FLAGS = [  # the tutorial's step 3 (tests/test_sft.py's TUTORIAL_STEP3), verbatim but for --model
    "--train_type", "lora", "--dataset", "self_cognition.json", "--torch_dtype", "bfloat16",
    "--num_train_epochs", "10", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
    "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
    "--gradient_accumulation_steps", "16", "--eval_steps", "50", "--save_steps", "50", "--save_total_limit", "2",
    "--logging_steps", "5", "--max_length", "2048", "--output_dir", "output", "--system",
    "You are a helpful assistant.", "--warmup_ratio", "0.05", "--dataloader_num_workers", "4",
    "--model_author", "swift", "--model_name", "swift-robot",
]


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="one more run under cProfile: top functions by time")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the tunesmith source tree to run (A/B against "
                    "an earlier commit: git archive COMMIT src | tar -x -C DIR, then --src DIR/src)")
    ap.add_argument("extra", nargs="*", help="more sft flags after --, e.g. -- --torch_compile true")
    a = ap.parse_args()
    from infer import warm_page_cache, write_weights  # bench/infer.py
    from tests.tutorial_rows import TUTORIAL_ROWS

    if not list(a.model_dir.glob("*.safetensors")):
        write_weights(a.model_dir, 28)
    warm_page_cache(a.model_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(a.src.resolve()), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "tunesmith-pyc"))
    emit({"event": "bytecode", "PYTHONPYCACHEPREFIX": env["PYTHONPYCACHEPREFIX"],
          "dont_write_bytecode_was_set": "PYTHONDONTWRITEBYTECODE" in os.environ})
    for rep in range(-1, a.repeat):  # rep -1: the untimed run that fills the bytecode cache
        with tempfile.TemporaryDirectory() as work:
            Path(work, "self_cognition.json").write_text(json.dumps(TUTORIAL_ROWS, ensure_ascii=False))
            cmd = [sys.executable, "-m", "tunesmith", "sft", "--model", str(a.model_dir.resolve()), *TUTORIAL_FLAGS,
                   *a.extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                emit({"rep": rep, "error": proc.stderr[-2000:]})
                return 1
            runs = sorted(Path(work, "output").glob("v*"))
            summary = json.loads((runs[-1] / "summary.json").read_text())
            adapter = Path(work, summary["last_checkpoint"], "adapter_model.safetensors")
            if rep < 0:
                continue
            emit({"rep": rep, "src": str(a.src), "extra": a.extra, "wall_s": round(wall, 1), "train_s": summary["seconds"],
                  "steps": summary["steps"], "peak_gib": round(summary["peak_memory_gib"], 2),
                  "final_loss": round(summary["final_loss"], 4), "adapter_saved": adapter.is_file(),
                  "phases_s": summary.get("phases_s"),  # startup, data, load, encode, setup, fit; the rest: wall
                  "after_fit_s": round(wall - sum((summary.get("phases_s") or {}).values()), 1)})
            for line in proc.stderr.splitlines()[-12:]:
                print("  | " + line, file=sys.stderr)
    if a.profile:
        with tempfile.TemporaryDirectory() as work:
            Path(work, "self_cognition.json").write_text(json.dumps(TUTORIAL_ROWS, ensure_ascii=False))
            prof = Path(work, "sft.prof")
            subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "tunesmith", "sft", "--model",
                            str(a.model_dir.resolve()), *TUTORIAL_FLAGS, *a.extra], cwd=work, env=env,
                           capture_output=True, check=True)
            import pstats

            stats = pstats.Stats(str(prof)).sort_stats("cumulative")
            stats.print_stats("tunesmith|safetensors|cuda/__init__|optim", 40)  # our phases, load, CUDA start
            stats.sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
