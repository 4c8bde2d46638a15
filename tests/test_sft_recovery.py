"""`tunesmith sft` when a disk, a kill or a damaged file gets in the way: resuming a finished run, a full disk or an
I/O error on every file a run writes, rotation and kills that never leave a half checkpoint, damaged checkpoints and
changed flags on resume, and run folders of runs that never trained. All on the tiny Qwen2.5 folder (CPU, fp32).

Every error is checked as the CLI prints it: one `error:` line, no traceback; and after it, the checkpoints left
are complete and the run resumes to the same end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main
from tunesmith.files import read_json
from tunesmith.model.lora import check_adapter_config, read_adapter_config, read_adapter_weights
from tunesmith.train import checkpoint as ckpt_io
from tunesmith.train.checkpoint import load_trainer_state

BIN = Path(sys.executable).parent


def write_rows(path: Path, n: int = 8) -> Path:
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}: " + " ".join(["word"] * (2 + i % 4))}
            for i in range(n)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def sft_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--dataset", str(data), "--output_dir", str(out), "--torch_dtype", "float32",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_steps", "1",
            "--logging_steps", "1", "--max_steps", "2", *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The CLI's one error sentence: exactly one `error:` line, the last one, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert sum("error:" in line for line in lines) == 1 and lines[-1].startswith("error: "), err
    assert lines[-1].endswith("."), err
    return lines[-1]


def runs_in(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []


def train_steps(run: Path) -> list[int]:
    steps = []
    for line in (run / "logging.jsonl").read_text().splitlines():
        rec = json.loads(line)  # every line is whole JSON
        if "loss" in rec:
            steps.append(int(rec["global_step/max_steps"].split("/")[0]))
    return steps


def checkpoint_problems(root: Path) -> tuple[int, list[str]]:
    """(checkpoint folders found, those that are not complete) under root: a `checkpoint-N` must hold a readable
    adapter, config, trainer state and args.json."""
    found, bad = 0, []
    for ckpt in sorted(root.rglob("checkpoint-*")):
        if not ckpt.is_dir() or not ckpt.name.split("-")[-1].isdigit():
            continue
        found += 1
        try:
            check_adapter_config(read_adapter_config(ckpt), ckpt)
            read_adapter_weights(ckpt)
            assert load_trainer_state(ckpt)["step"] == int(ckpt.name.split("-")[-1])
            read_json(ckpt / "args.json")
        except Exception as e:  # noqa: BLE001
            bad.append(f"{ckpt}: {e}")
    return found, bad


def no_leftovers(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".checkpoint-", ".deleting-"))]
    assert not left, left


def snapshot(root: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------------
# 1. Resuming a finished run
# ---------------------------------------------------------------------------------------------------------------

def test_resume_from_final_checkpoint_says_finished_or_trains_on(qwen_tiny_dir, tmp_path, capsys):
    data, out = write_rows(tmp_path / "data.json"), tmp_path / "out"
    assert run_cli(sft_argv(qwen_tiny_dir, data, out), capsys)[0] == 0
    (run,) = runs_in(out)
    before = snapshot(run)
    for extra in ([], ["--max_steps", "1"], ["--max_steps", "-1", "--num_train_epochs", "0.5"]):
        code, err = run_cli(sft_argv(qwen_tiny_dir, data, out, "--resume_from_checkpoint", str(run / "checkpoint-2"),
                                     *extra), capsys)
        assert code == 0, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "finished" in lines[0] and "--max_steps" in lines[0], err
        assert snapshot(run) == before  # summary.json, args.json, the log, the plot, TensorBoard: untouched
    assert read_json(run / "summary.json")["last_checkpoint"] == str(run / "checkpoint-2")

    # more steps asked: it trains on, by --max_steps and by epochs (8 rows, 2 a step: 4 steps an epoch)
    code, err = run_cli(sft_argv(qwen_tiny_dir, data, out, "--resume_from_checkpoint", str(run / "checkpoint-2"),
                                 "--max_steps", "3"), capsys)
    assert code == 0 and "Traceback" not in err, err
    assert read_json(run / "summary.json")["last_checkpoint"] == str(run / "checkpoint-3")
    code, err = run_cli(sft_argv(qwen_tiny_dir, data, out, "--resume_from_checkpoint", str(run / "checkpoint-3"),
                                 "--max_steps", "-1", "--num_train_epochs", "1"), capsys)
    assert code == 0, err
    assert read_json(run / "summary.json")["last_checkpoint"] == str(run / "checkpoint-4")
    assert train_steps(run) == [1, 2, 3, 4]
    assert checkpoint_problems(out) == (4, [])


# ---------------------------------------------------------------------------------------------------------------
# 2. A full disk or an I/O error on each file a run writes
# ---------------------------------------------------------------------------------------------------------------

def run_relative(path) -> str:
    """A path written inside a run folder, as the file it becomes: `.checkpoint-2.tmp/x` -> `checkpoint-2/x`,
    `args.json.tmp` -> `args.json`."""
    parts = list(Path(path).parts)
    i = max(k for k, part in enumerate(parts) if part.startswith("v") and part[1:].split("-")[0].isdigit())
    rel = [p.removeprefix(".").removesuffix(".tmp") if p.startswith(".checkpoint-") else p for p in parts[i + 1:]]
    rel[-1] = rel[-1].removesuffix(".tmp")
    return "/".join(rel)


class Fault:
    """Makes the `nth` write of one run file fail with OSError(code), after writing part of it (as a disk that
    fills up midway does), through each way tunesmith writes files: Path.write_text (JSON), safetensors' save_file,
    torch.save (trainer_state.pt), os.write (logging.jsonl) and matplotlib's savefig (loss.png)."""

    def __init__(self, monkeypatch, target: str, code: int, nth: int = 1):
        self.target, self.code, self.nth, self.seen, self.fired = target, code, nth, 0, False
        import matplotlib.figure
        import safetensors.torch

        real_write_text, real_save_file, real_torch_save = Path.write_text, safetensors.torch.save_file, torch.save
        real_os_write, real_savefig = os.write, matplotlib.figure.Figure.savefig
        fault = self

        def write_text(path, text, *a, **k):
            if fault.hit(path):
                real_write_text(path, text[: len(text) // 2], *a, **k)
                fault.fail()
            return real_write_text(path, text, *a, **k)

        def save_file(tensors, filename, *a, **k):
            if fault.hit(filename):
                Path(filename).write_bytes(b"\0" * 100)
                fault.fail()
            return real_save_file(tensors, filename, *a, **k)

        def torch_save(obj, f, *a, **k):
            if fault.hit(getattr(f, "name", f)):
                f.write(b"PK\3\4partial")
                fault.fail()
            return real_torch_save(obj, f, *a, **k)

        def os_write(fd, data):
            try:
                name = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                name = ""
            if name.endswith(".jsonl") and fault.hit(name):
                real_os_write(fd, bytes(data)[: len(data) // 2])
                fault.fail()
            return real_os_write(fd, data)

        def savefig(fig, fname, *a, **k):
            if fault.hit(fname):
                Path(fname).write_bytes(b"\x89PNG partial")
                fault.fail()
            return real_savefig(fig, fname, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(os, "write", os_write)
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)

    def hit(self, path) -> bool:
        try:
            rel = run_relative(path)
        except ValueError:
            return False
        if rel != self.target or self.fired:
            return False
        self.seen += 1
        return self.seen == self.nth

    def fail(self):
        self.fired = True
        raise OSError(self.code, os.strerror(self.code))


# (the file, which write of it fails, the checkpoint to resume from afterwards: None = run again from scratch)
FAULTS = [
    ("args.json", 1, None),  # the run's, before training
    ("checkpoint-2/adapter_model.safetensors", 1, "checkpoint-1"),
    ("checkpoint-2/adapter_config.json", 1, "checkpoint-1"),
    ("checkpoint-2/trainer_state.pt", 1, "checkpoint-1"),
    ("checkpoint-2/args.json", 1, "checkpoint-1"),
    ("logging.jsonl", 2, "checkpoint-1"),  # step 2's line
    ("loss.png", 1, "checkpoint-1"),  # the plot after checkpoint-1
    ("summary.json", 1, "checkpoint-2"),  # after the last checkpoint: the resume finds the run finished
]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("target, nth, resume_from", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_failed_write_is_one_sentence_and_the_run_resumes(qwen_tiny_dir, tmp_path, monkeypatch, capsys, target,
                                                           nth, resume_from, code):
    data, out = write_rows(tmp_path / "data.json"), tmp_path / "out"
    fault = Fault(monkeypatch, target, code, nth)
    failed, err = run_cli(sft_argv(qwen_tiny_dir, data, out), capsys)
    monkeypatch.undo()
    assert fault.fired and failed == 1, err
    line = error_line(err)
    assert f"/{target} (" in line and os.strerror(code) in line and " free on that disk" in line, line
    no_leftovers(tmp_path)
    assert checkpoint_problems(out)[1] == []
    runs = runs_in(out)
    if resume_from is None:
        assert runs == [] and "run again" in line, (runs, line)  # nothing was trained: no run folder is left
        assert run_cli(sft_argv(qwen_tiny_dir, data, out), capsys)[0] == 0
        (run,) = runs_in(out)
    else:
        (run,) = runs
        said = f"(last: {run / resume_from})" if target == "summary.json" else \
            f"--resume_from_checkpoint {run / resume_from}"
        assert said in line, line
        assert all(json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines())  # no half line
        code_, err_ = run_cli(sft_argv(qwen_tiny_dir, data, out, "--resume_from_checkpoint", str(run / resume_from)),
                              capsys)
        assert code_ == 0 and "Traceback" not in err_, err_
    assert train_steps(run) == [1, 2]
    assert checkpoint_problems(out) == (2, [])
    assert (run / "checkpoint-2").is_dir() and (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    no_leftovers(tmp_path)


def small_disk(path: Path, size: str) -> bool:
    """A tmpfs of `size` mounted at path (root only); False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow  # the tunesmith CLI in subprocesses, on a real filling disk
def test_a_really_full_disk_is_one_sentence_and_resumes_after_space_is_freed(qwen_tiny_dir, tmp_path):
    disk = tmp_path / "disk"
    if not small_disk(disk, "2m"):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        data = write_rows(tmp_path / "data.json")
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
        argv = sft_argv(qwen_tiny_dir, data, disk / "out", "--max_steps", "40")
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * 800_000)  # room for 2 checkpoints (~470 KB each: adapter, AdamW state) and logs
        p = subprocess.run(["tunesmith", *argv], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 1, p.stderr[-2000:]
        line = error_line(p.stderr)
        assert "No space left on device" in line and "free on that disk" in line, line
        no_leftovers(disk)
        found, bad = checkpoint_problems(disk)
        assert bad == [] and found >= 1, (found, bad)
        (run,) = runs_in(disk / "out")
        last = ckpt_io.list_checkpoints(run)[-1]
        ballast.unlink()  # space freed
        keep = ["--save_total_limit", "1", "--save_steps", "20"]
        p = subprocess.run(["tunesmith", *argv, *keep, "--resume_from_checkpoint", str(last)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert train_steps(run) == list(range(1, 41))
        assert checkpoint_problems(disk)[1] == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# 3. Rotation, kills, fsync, damaged checkpoints, changed flags
# ---------------------------------------------------------------------------------------------------------------

class Killed(BaseException):
    pass


def test_rotation_renames_out_of_the_name_before_deleting(qwen_tiny_dir, tmp_path, monkeypatch, capsys):
    """A kill in the middle of deleting a rotated checkpoint leaves `.deleting-checkpoint-N`, never a
    `checkpoint-N` with files missing; the next resume removes it."""
    data, out = write_rows(tmp_path / "data.json"), tmp_path / "out"
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):
        path = Path(path)
        if path.name.startswith(".deleting-checkpoint-") and path.exists():
            next(p for p in path.iterdir() if p.is_file()).unlink()  # one file gone, then the process dies
            raise Killed
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        main(sft_argv(qwen_tiny_dir, data, out, "--save_total_limit", "1", "--max_steps", "3"))
    monkeypatch.undo()
    (run,) = runs_in(out)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [".deleting-checkpoint-1",
                                                                               "checkpoint-2"]
    assert checkpoint_problems(out) == (1, [])
    code, err = run_cli(sft_argv(qwen_tiny_dir, data, out, "--save_total_limit", "1", "--max_steps", "3",
                                 "--resume_from_checkpoint", str(run / "checkpoint-2")), capsys)
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert train_steps(run) == [1, 2, 3]
    no_leftovers(tmp_path)


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(qwen_tiny_dir, tmp_path, monkeypatch, capsys):
    data, out = write_rows(tmp_path / "data.json"), tmp_path / "out"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert main(sft_argv(qwen_tiny_dir, data, out, "--max_steps", "1")) == 0
    monkeypatch.undo()
    (run,) = runs_in(out)
    ckpt = run / "checkpoint-1"
    renamed = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(ckpt))
    tmp = events[renamed][1]
    synced = {e[1] for e in events[:renamed] if e[0] == "fsync"}
    files = {str(Path(tmp) / p.relative_to(ckpt)) for p in ckpt.rglob("*")}
    assert files and files | {tmp} <= synced, sorted(files | {tmp} - synced)
    assert ("fsync", str(run)) in events[renamed:]  # the rename itself reached the disk before "saved"


@pytest.mark.slow  # kills real tunesmith processes at random moments
def test_kills_at_random_moments_never_leave_a_half_checkpoint(qwen_tiny_dir, tmp_path):
    data, out = write_rows(tmp_path / "data.json", 16), tmp_path / "out"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    argv = sft_argv(qwen_tiny_dir, data, out, "--save_total_limit", "2", "--max_steps", "400")
    rng = random.Random(7)
    kills, resume = 0, []
    for _ in range(10):
        p = subprocess.Popen(["tunesmith", *argv, *resume], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        runs = []
        while time.time() < deadline and not (runs and ckpt_io.list_checkpoints(runs[0])):
            time.sleep(0.2)
            runs = runs_in(out)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere among steps, saves and rotations (a save every step)
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        kills += 1
        found, bad = checkpoint_problems(out)
        assert bad == [] and found >= 1, bad
        (run,) = runs_in(out)
        resume = ["--resume_from_checkpoint", str(ckpt_io.list_checkpoints(run)[-1])]
    p = subprocess.run(["tunesmith", *argv, *resume, "--max_steps", str(int(resume[1].rsplit("-", 1)[1]) + 2)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    no_leftovers(out)
    steps = train_steps(run)
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == len(steps)  # each step once, in order
    print(f"\nkill points tried: {kills}; corrupt checkpoint folders: {len(checkpoint_problems(out)[1])}")


@pytest.fixture(scope="module")
def finished_run(qwen_tiny_dir, tmp_path_factory):
    """A 2-step LoRA run; each test damages its own copy."""
    root = tmp_path_factory.mktemp("finished")
    data = write_rows(root / "data.json")
    assert main(sft_argv(qwen_tiny_dir, data, root / "out")) == 0
    (run,) = runs_in(root / "out")
    return data, run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = [
    ("adapter_model.safetensors", truncate),
    ("adapter_model.safetensors", lambda p: p.write_bytes(b"\xff" * 64)),
    ("adapter_config.json", truncate),
    ("adapter_config.json", lambda p: p.write_text('{"peft_type": "LORA"}')),
    ("trainer_state.pt", truncate),
    ("trainer_state.pt", lambda p: p.write_bytes(b"")),
]


@pytest.mark.parametrize("name, damage", DAMAGES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DAMAGES)])
def test_a_damaged_checkpoint_is_one_sentence_naming_the_file(finished_run, tmp_path, capsys, qwen_tiny_dir, name,
                                                             damage):
    data, run = finished_run
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoint-1"
    damage(ckpt / name)
    commands = [sft_argv(qwen_tiny_dir, data, tmp_path, "--resume_from_checkpoint", str(ckpt))]
    if name != "trainer_state.pt":  # what infer and export read
        commands += [["infer", "--adapters", str(ckpt), "--query", "hi", "--max_new_tokens", "2"],
                     ["export", "--adapters", str(ckpt)],
                     ["export", "--adapters", str(ckpt), "--merge_lora", "true", "--output_dir", str(tmp_path / "m")]]
    for argv in commands:
        before = snapshot(copy)
        code, err = run_cli(argv, capsys)
        line = error_line(err)
        assert code == 1 and str(ckpt / name) in line and ("damaged" in line or "invalid JSON" in line), (argv, line)
        assert snapshot(copy) == before, argv  # the run's records are untouched
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flag, value, shown", [
    ("--lora_rank", "16", "--lora_rank 16 (the checkpoint's: 8)"),
    ("--dataset", "other.json", "--dataset other.json (the checkpoint's: "),
    ("--model", "smollm2-135m-instruct", "--model smollm2-135m-instruct (the checkpoint's: "),
])
def test_resume_with_a_changed_rank_model_or_dataset_says_what_changed(finished_run, tmp_path, capsys, monkeypatch,
                                                                      qwen_tiny_dir, flag, value, shown):
    data, run = finished_run
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "other.json", 5)
    before = snapshot(run)
    argv = sft_argv(qwen_tiny_dir, data, tmp_path, "--max_steps", "3", "--resume_from_checkpoint",
                    str(run / "checkpoint-1"), flag, value)
    code, err = run_cli(argv, capsys)
    line = error_line(err)
    assert code == 1 and shown in line and "differ from the run it continues" in line, line
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------------------
# 5. Runs that never trained leave no folder; a resume logs each step once
# ---------------------------------------------------------------------------------------------------------------

def test_a_run_that_fails_before_training_leaves_no_run_folder(qwen_tiny_dir, tmp_path, capsys):
    data, out = write_rows(tmp_path / "data.json"), tmp_path / "out"
    code, err = run_cli(sft_argv(qwen_tiny_dir, data, out, "--max_length", "8"), capsys)
    assert code == 1 and "no training sample is left" in error_line(err), err
    assert runs_in(out) == []


def test_a_resumed_run_logs_each_step_once(qwen_tiny_dir, tmp_path, monkeypatch, capsys):
    from tunesmith.train.loop import Trainer

    data, out = write_rows(tmp_path / "data.json"), tmp_path / "out"
    train_step = Trainer.train_step

    def dies_in_step_4(self):
        if self.step == 3:
            raise Killed
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", dies_in_step_4)
    with pytest.raises(Killed):
        main(sft_argv(qwen_tiny_dir, data, out, "--max_steps", "4", "--save_steps", "2"))
    monkeypatch.undo()
    (run,) = runs_in(out)
    assert train_steps(run) == [1, 2, 3]  # step 3 was logged, its checkpoint never written
    code, err = run_cli(sft_argv(qwen_tiny_dir, data, out, "--max_steps", "4", "--save_steps", "2",
                                 "--resume_from_checkpoint", str(run / "checkpoint-2")), capsys)
    assert code == 0, err
    assert train_steps(run) == [1, 2, 3, 4]
