"""Training logs: logging.jsonl (ms-swift's keys), TensorBoard events, a loss plot, and a progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, quiet: bool = False):
        self.run_dir = run_dir
        self.total = total_steps
        self.quiet = quiet
        self.records: list[dict] = []
        self.start = time.time()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "runs"))
        except ImportError:  # tensorboard is a dependency; without it the jsonl and PNG still cover everything
            self._tb = None

    def log(self, step: int, values: dict) -> None:
        rec = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in values.items()}
        rec["global_step/max_steps"] = f"{step}/{self.total}"
        elapsed = time.time() - self.start
        rec["elapsed_time"] = _fmt(elapsed)
        rec["remaining_time"] = _fmt(elapsed / max(step, 1) * (self.total - step))
        self.records.append({"step": step, **rec})
        with open(self.run_dir / "logging.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}", v, step)
            self._tb.flush()

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.quiet:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\rTrain [{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s "
                         f"ETA {_fmt(eta)}   ")
        sys.stderr.flush()
        if step == self.total:
            sys.stderr.write("\n")

    def plot(self) -> Path | None:
        """loss.png: train loss (and eval loss where present) against steps."""
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        ev = [(r["step"], r["eval_loss"]) for r in self.records if "eval_loss" in r]
        if not train and not ev:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss")
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.run_dir / "loss.png"
        fig.savefig(out)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60}m {s % 60}s" if s >= 3600 else f"{s // 60}m {s % 60}s"
