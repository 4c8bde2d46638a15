"""Training logs: logging.jsonl (ms-swift's keys), TensorBoard events, a loss plot, and a progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tunesmith.files import write_bytes_atomic, writing
from tunesmith.progress import bar_line, duration


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
        rec["elapsed_time"] = duration(elapsed)
        rec["remaining_time"] = duration(elapsed / max(step, 1) * (self.total - step))
        self.records.append({"step": step, **rec})
        append_line(self.run_dir / "logging.jsonl", json.dumps(rec, ensure_ascii=False))
        if self._tb is not None:
            with writing(self.run_dir / "runs"):
                for k, v in values.items():
                    if isinstance(v, (int, float)):
                        tag = k.replace("eval_", "eval/") if k.startswith("eval_") else f"train/{k}"
                        self._tb.add_scalar(tag, v, step)
                self._tb.flush()

    def resume(self, step: int) -> None:
        """A run resumed at `step`: logging.jsonl keeps only its lines up to that step (a killed run may have logged
        further), and TensorBoard purges its events after it, so no step is logged twice."""
        path = self.run_dir / "logging.jsonl"
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _line_step(line) <= step]
            if len(kept) != len(lines):
                write_bytes_atomic(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept),
                                                                          encoding="utf-8"))
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.run_dir / "runs"), purge_step=step + 1)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.quiet:
            return
        line = bar_line("Train", step, self.total, time.time() - self.start, f"loss {loss:.4f} {tokens_per_s:,.0f} tok/s")
        sys.stderr.write(f"\r{line}   ")
        sys.stderr.flush()
        self._line_open = step != self.total
        if step == self.total:
            sys.stderr.write("\n")

    def end_line(self) -> None:
        """End an unfinished progress line (a run stopped by an error), so the error starts a line of its own."""
        if getattr(self, "_line_open", False):
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._line_open = False

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
        try:  # atomically: a reader (or a full disk) never leaves half a PNG
            write_bytes_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))
        finally:
            plt.close(fig)
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def append_line(path: Path, line: str) -> None:
    """Append one line; a failed write (WriteError) cuts the file back to what it held, so no half line stays."""
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            data = memoryview((line + "\n").encode("utf-8"))
            try:
                while data:
                    data = data[os.write(fd, data):]
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def _line_step(line: str) -> int:
    """The step of a logging.jsonl line; a line that cannot be read counts as step 0 (kept)."""
    try:
        return int(str(json.loads(line).get("global_step/max_steps", "0")).split("/")[0])
    except (ValueError, AttributeError, TypeError):
        return 0


