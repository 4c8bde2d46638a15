"""Does the tutorial's mixed-data step keep general ability? Identity-only vs identity + general-distill, on CPU.

Runs `tunesmith demo` twice with the same seed on the bundled SmolLM2-135M-Instruct: once on the built-in
self-cognition data alone (the demo's default), once mixed with N rows of general-distill (the base model's own
answers to general instructions, made offline). Prints one JSON line per recipe with the identity and retention
numbers from each run's eval.json, and a last line comparing them; with --out the lines go to a file too.

    python bench/retention_mix.py --rows 120 --out bench/results-retention-mix-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(out: Path, dataset: list[str], seed: int) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "tunesmith", "demo", "--output_dir", str(out), "--seed", str(seed),
           "--dataset", *dataset]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    run = sorted(out.glob("v*-*"))[-1]
    report = json.loads((run / "eval" / "eval.json").read_text())
    ident, ret = report["identity"]["by_lang"], report["retention"]
    steps = [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines() if x.strip()]
    return {
        "recipe": " + ".join(dataset),
        "adopted_en": ident["en"]["tuned"]["adopted"],
        "adopted_zh": ident["zh"]["tuned"]["adopted"],
        "leaked": ident["all"]["tuned"]["leaked"],
        "retention_mean_kl": ret["mean_kl"],
        "retention_unchanged": ret["unchanged"],
        "retention_retained": ret["retained"],
        "optimizer_steps": int(steps[-1]["global_step/max_steps"].split("/")[1]) if steps else 0,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=120, help="general-distill rows mixed in")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, help="also write the JSON lines here")
    a = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in (["self-cognition"], ["self-cognition", f"general-distill#{a.rows}"]):
            lines.append(run_demo(Path(tmp) / str(len(lines)), dataset, a.seed))
            print(json.dumps(lines[-1]), flush=True)
    only, mixed = lines
    lines.append({
        "compare": "mixed vs identity-only",
        "kl_ratio": round(mixed["retention_mean_kl"] / only["retention_mean_kl"], 3),
        "retained_gain": round(mixed["retention_retained"] - only["retention_retained"], 3),
        "unchanged_gain": round(mixed["retention_unchanged"] - only["retention_unchanged"], 3),
        "mixed_retains_more": mixed["retention_mean_kl"] < only["retention_mean_kl"]
        and mixed["retention_retained"] >= only["retention_retained"],
    })
    print(json.dumps(lines[-1]), flush=True)
    if a.out:
        a.out.write_text("".join(json.dumps(x) + "\n" for x in lines))


if __name__ == "__main__":
    main()
