"""Does loading the model overlap with the imports the training run makes beside it (commands/sft.prewarm)?

    PYTHONPATH=src python bench/load_overlap.py --model-dir DIR [--device cuda]

Each mode in a fresh process: `load` (tunesmith's load_model alone), `imports` (prewarm's imports alone),
`load+imports` (both, as `tunesmith sft` runs them). On the H200 (2026-12-01, CUDA started first, 15.2 GB): load
with safetensors' safe_open 4.49 s, mmap + torch.frombuffer + .to(device) one thread per shard 3.22 s (the `raw`
modes this bench had then), imports 0.7 s, mostly overlapped (4.8 and 3.83 s together); that led to
model/load.read_safetensors.
`cuda` / `cuda+imports`: CUDA's start (2.3 s of the seed job's load) alone, and in a thread beside the imports:
whether it could overlap the work before the load. JSON lines out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def one(mode: str, model_dir: str, device: str) -> dict:
    t0 = time.time()
    import torch

    t_torch = time.time() - t0
    if mode.startswith("cuda"):  # CUDA's start alone, or in a thread beside the imports: does it hold the GIL?
        t1 = time.time()
        start = threading.Thread(target=lambda: torch.zeros(1, device=device))
        start.start()
        if "imports" in mode:
            from tunesmith.commands.sft import prewarm

            prewarm()
        imports_s = round(time.time() - t1, 2)
        start.join()
        return {"mode": mode, "import_torch_s": round(t_torch, 2), "imports_s": imports_s,
                "all_s": round(time.time() - t1, 2)}
    if device == "cuda":
        torch.zeros(1, device=device)
    from tunesmith.model.load import load_model
    from tunesmith.commands.sft import prewarm

    t1 = time.time()
    imports = threading.Thread(target=prewarm) if "imports" in mode else None
    if imports:
        imports.start()
    load_s = None
    if "load" in mode:
        load_model(model_dir, "bfloat16", torch.device(device))
        if device == "cuda":
            torch.cuda.synchronize()
        load_s = round(time.time() - t1, 2)
    if imports:
        imports.join()
    return {"mode": mode, "import_torch_s": round(t_torch, 2), "load_s": load_s, "all_s": round(time.time() - t1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in this process (the driver's child)
    ap.add_argument("--modes", nargs="+", default=["load", "imports", "load+imports", "load", "load+imports", "cuda",
                                                   "cuda+imports", "cuda", "cuda+imports"])
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one(a.mode, a.model_dir, a.device)), flush=True)
        return
    for f in Path(a.model_dir).glob("*.safetensors"):  # page cache warm
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    for mode in a.modes:
        subprocess.run([sys.executable, __file__, "--model-dir", a.model_dir, "--device", a.device, "--mode", mode],
                       check=True)


if __name__ == "__main__":
    main()
