"""Does loading the model overlap with the imports the training run makes beside it (train/loop.prewarm)?

    PYTHONPATH=src python bench/load_overlap.py --model-dir DIR [--device cuda]

Each mode in a fresh process: `load` (tunesmith's load_model alone), `imports` (prewarm's imports alone),
`load+imports` (both, as `tunesmith sft` runs them), and the same two with `raw`: shards read through mmap +
torch.frombuffer + .to(device), whose copies release the GIL, instead of safetensors' safe_open. On the H200
(session 17) the seed job's load phase (8.5-9.9 s) looked like load (3.6 s) + imports (5.2 s) added up, while on a
2-core CPU they overlap (3.1 + 2.0 s alone, 3.7 s together); this tells whether the loader holds the GIL there.
`cuda` / `cuda+imports`: CUDA's start (2.3 s of the seed job's load) alone, and in a thread beside the imports:
whether it could overlap the work before the load. JSON lines out.
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys
import threading
import time
from pathlib import Path

DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def raw_shard(path: str, device):
    """A safetensors shard's tensors on `device` without safe_open: header JSON, then views of one mmap."""
    import warnings

    import torch

    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer: the views are only copied from
        data = torch.frombuffer(mm, dtype=torch.uint8)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        t = data[8 + n + b : 8 + n + e].view(getattr(torch, DTYPES[meta["dtype"]])).view(meta["shape"])
        out[name] = t.to(device)
    return out


class RawOpen:
    """Stands in for safetensors.safe_open in the `raw` modes."""

    def __init__(self, path, framework="pt", device="cpu"):
        self.tensors = raw_shard(path, device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        return list(self.tensors)

    def get_tensor(self, name):
        return self.tensors[name]


def one(mode: str, model_dir: str, device: str) -> dict:
    t0 = time.time()
    import torch

    t_torch = time.time() - t0
    if mode.startswith("cuda"):  # CUDA's start alone, or in a thread beside the imports: does it hold the GIL?
        t1 = time.time()
        start = threading.Thread(target=lambda: torch.zeros(1, device=device))
        start.start()
        if "imports" in mode:
            from tunesmith.train.loop import prewarm

            prewarm()
        imports_s = round(time.time() - t1, 2)
        start.join()
        return {"mode": mode, "import_torch_s": round(t_torch, 2), "imports_s": imports_s,
                "all_s": round(time.time() - t1, 2)}
    if device == "cuda":
        torch.zeros(1, device=device)
    if "raw" in mode:
        import safetensors

        safetensors.safe_open = RawOpen
    from tunesmith.model.load import load_model
    from tunesmith.train.loop import prewarm

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
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one(a.mode, a.model_dir, a.device)), flush=True)
        return
    for f in Path(a.model_dir).glob("*.safetensors"):  # page cache warm
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    for mode in ("load", "imports", "load+imports", "raw-load", "raw-load+imports", "load+imports", "cuda",
                 "cuda+imports", "cuda", "cuda+imports"):
        subprocess.run([sys.executable, __file__, "--model-dir", a.model_dir, "--device", a.device, "--mode", mode],
                       check=True)


if __name__ == "__main__":
    main()
