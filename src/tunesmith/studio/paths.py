"""Where the studio may read and write: the workdir (uploads, runs, exports, its own job records) and the model
paths given on the command line (read only). A path typed into the page is taken relative to the workdir; one
with a `..` part, or an absolute one outside these roots, is refused in one sentence.

  <workdir>/data/        uploaded files, and the cleaned copies the runs train on
  <workdir>/runs/<id>/   one folder per training run (the sft run folder: args.json, logging.jsonl, checkpoints)
                         plus job.json and job.log, the studio's record of the subprocess
  <workdir>/.studio/jobs/<id>/   the other subprocesses (estimate, check, export, servers): job.json, job.log
"""

from __future__ import annotations

import re
from pathlib import Path

from tunesmith.errors import UserError

BUNDLED = "smollm2-135m-instruct"
SAFE_NAME = re.compile(r"[^\w.\-]+")


class Workdir:
    def __init__(self, root: str | Path, model_paths: list[str] = ()):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("data", "runs", ".studio/jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.model_roots = [Path(p).expanduser().resolve() for p in model_paths]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def jobs(self) -> Path:
        return self.root / ".studio" / "jobs"

    def resolve(self, text: str, field: str, write: bool = False) -> Path:
        """The path the page named, confined: under the workdir (read or write) or a given model path (read)."""
        text = (text or "").strip()
        if not text:
            raise UserError(f"{field} is empty; type a path under the studio's folder {self.root}.")
        raw = Path(text).expanduser()
        if ".." in raw.parts:
            raise UserError(f"{field} '{text}' contains '..'; give a path inside {self.root} without '..'.")
        path = (raw if raw.is_absolute() else self.root / raw).resolve()
        roots = [self.root] if write else [self.root, *self.model_roots]
        if not any(path == r or path.is_relative_to(r) for r in roots):
            where = self.root if write else ", ".join(str(r) for r in roots)
            raise UserError(f"{field} '{text}' is outside the folders this studio may {'write' if write else 'read'} "
                            f"({where}); move it there, or start web-ui with --workdir or --models naming its folder.")
        return path

    def model(self, text: str) -> str:
        """A model the page may use: the bundled alias, or a folder / .gguf file under the allowed roots."""
        if (text or "").strip().lower() == BUNDLED:
            return BUNDLED
        path = self.resolve(text, "model")
        if not path.exists():
            raise UserError(f"model '{text}' does not exist under {self.root}; check the path, or pick the bundled "
                            f"model.")
        return str(path)

    def rel(self, path: Path | str) -> str:
        """A path as the page and the shown command line write it: relative to the workdir when inside it."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def upload_path(self, filename: str) -> Path:
        """Where an uploaded file lands: <workdir>/data/<its base name, made safe>."""
        name = SAFE_NAME.sub("_", Path(filename or "").name).strip("._")
        suffix = Path(name).suffix.lower()
        if suffix not in (".json", ".jsonl", ".csv", ".parquet"):
            raise UserError(f"file '{filename}' is not .json, .jsonl, .csv or .parquet; save it in one of those "
                            f"formats.")
        if not Path(name).stem:
            raise UserError(f"file name '{filename}' has no usable characters; rename the file.")
        return self.data / name

    def browse(self) -> list[dict]:
        """Model candidates under the workdir and the given model paths: folders with a config.json, .gguf files."""
        found = []
        for root in [self.root, *self.model_roots]:
            if root.is_file() and root.suffix.lower() == ".gguf":
                found.append(root)
                continue
            if not root.is_dir():
                continue
            for p in sorted(root.rglob("*")):
                if len(p.relative_to(root).parts) > 5 or any(part.startswith(".") for part in p.relative_to(root).parts):
                    continue
                if (p.is_file() and p.suffix.lower() == ".gguf") or (p.is_dir() and (p / "config.json").is_file()
                                                                      and any(p.glob("*.safetensors"))):
                    found.append(p)
        return [{"path": self.rel(p), "kind": "gguf" if p.suffix.lower() == ".gguf" else "hf"} for p in found[:200]]
