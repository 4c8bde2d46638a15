"""The studio's subprocesses: every run, check, export and server is the real `tunesmith` CLI (or the estimate
probe) in a process of its own, so what the page starts can be started the same way in a terminal.

Each job has a folder holding job.json (argv, pid, the process's start time, exit code, whether a stop was asked)
and job.log (its stdout and stderr). A training run's folder is its sft run folder (<workdir>/runs/<id>/), so a
resume appends to the same record. Jobs run in a session of their own: they outlive a restart of web-ui, which
finds them again by reading job.json and checking that the pid is still the same process (its start time in
/proc); the exit code of a job that ended while no web-ui was watching is read from what it left: summary.json
(a run that finished), an `error: ...` line in its log (a failure), or a stop that was asked for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.files import write_json

JOB_FILE, LOG_FILE = "job.json", "job.log"
STOP_GRACE_S = 15.0  # after SIGINT, SIGKILL follows if the process has not ended
TAIL_LINES = 20


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def read_job(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def alive(job: dict) -> bool:
    pid, started = job.get("pid"), job.get("pid_start")
    return bool(pid) and job.get("rc") is None and process_start(pid) == started


def log_tail(folder: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last lines of job.log; a progress bar's carriage returns keep only its latest state."""
    path = Path(folder) / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        if parts:
            out.append(parts[-1].rstrip())
    return out[-lines:]


def error_sentence(folder: Path) -> str | None:
    """The CLI's one-sentence error (`error: ...`), the last one in the log."""
    found = None
    for line in log_tail(folder, 200):
        if line.startswith("error: "):
            found = line[len("error: "):]
        elif line.startswith("Traceback"):
            found = None
    if found is None:
        tail = log_tail(folder, 200)
        for line in reversed(tail):  # a crash with a traceback: its last line names the exception
            if re.match(r"^[A-Za-z_.]+(Error|Exception|Interrupt)\b", line):
                return line
    return found


def status(folder: Path, job: dict | None = None) -> dict:
    """job.json with `state`: running | done | stopped | failed, `error` (one sentence) and the log's tail."""
    job = job if job is not None else read_job(folder)
    if job is None:
        return {"state": "unknown", "error": None, "tail": []}
    out = dict(job)
    if alive(job):
        out["state"] = "running"
    else:
        rc = job.get("rc")
        if rc is None:  # ended while no web-ui watched it
            done = job.get("kind") == "train" and (Path(folder) / "summary.json").is_file() and \
                (Path(folder) / "summary.json").stat().st_mtime >= job.get("started", 0)
            rc = 0 if done else (130 if job.get("stop_requested") else None)
        if rc == 0:
            out["state"] = "done"
        elif job.get("stop_requested") or rc in (130, -2, -9, -15):
            out["state"] = "stopped"
        else:
            out["state"] = "failed"
    out["error"] = error_sentence(folder) if out["state"] == "failed" else None
    if out["state"] == "failed" and not out["error"]:
        out["error"] = f"the process ended with exit code {job.get('rc')} without an error message; see the log below."
    out["tail"] = log_tail(folder)
    return out


class Jobs:
    """Starts, watches and stops the studio's subprocesses; one job at a time per folder."""

    def __init__(self, cwd: Path):
        self.cwd = Path(cwd)
        self.lock = threading.Lock()
        self.children: dict[int, subprocess.Popen] = {}

    def start(self, folder: Path, kind: str, argv: list[str], meta: dict | None = None, env: dict | None = None) -> dict:
        """Run argv (a list; argv[0] 'tunesmith' runs this Python's tunesmith) with its output in folder/job.log."""
        folder = Path(folder)
        with self.lock:
            old = read_job(folder)
            if old is not None and alive(old):
                raise UserError(f"{folder.name} is still running (pid {old['pid']}); stop it before starting another "
                                f"job on the same folder.")
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "tunesmith", *argv[1:]] if argv[0] == "tunesmith" else list(argv)
            log = open(folder / LOG_FILE, "ab")
            header = f"$ {' '.join(argv)}\n".encode()
            log.write(header)
            log.flush()
            child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
            proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=child_env, start_new_session=True)
            log.close()
            attempts = (old or {}).get("attempts", []) + [{"argv": argv, "started": time.time()}]
            job = {**(old or {}), **(meta or {}), "kind": kind, "argv": argv, "pid": proc.pid,
                   "pid_start": None, "started": time.time(), "ended": None, "rc": None, "stop_requested": False,
                   "attempts": attempts}
            for _ in range(100):  # /proc may lag the fork by a moment
                job["pid_start"] = process_start(proc.pid)
                if job["pid_start"] is not None or proc.poll() is not None:
                    break
                time.sleep(0.01)
            write_json(folder / JOB_FILE, job)
            self.children[proc.pid] = proc
        threading.Thread(target=self._wait, args=(folder, proc), daemon=True, name=f"job-{proc.pid}").start()
        return job

    def _wait(self, folder: Path, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        with self.lock:
            job = read_job(folder) or {}
            if job.get("pid") == proc.pid:
                job.update(rc=rc, ended=time.time())
                write_json(folder / JOB_FILE, job)
            self.children.pop(proc.pid, None)

    def stop(self, folder: Path) -> dict:
        """SIGINT to the job's process group (the CLI stops as on Ctrl-C; checkpoints already written stay),
        SIGKILL after STOP_GRACE_S."""
        folder = Path(folder)
        with self.lock:
            job = read_job(folder)
            if job is None or not alive(job):
                raise UserError(f"{folder.name} is not running, so there is nothing to stop.")
            job["stop_requested"] = True
            write_json(folder / JOB_FILE, job)
        pid, started = job["pid"], job["pid_start"]
        try:
            os.killpg(pid, signal.SIGINT)
        except ProcessLookupError:
            pass

        def kill_later():
            deadline = time.time() + STOP_GRACE_S
            while time.time() < deadline:
                if process_start(pid) != started:
                    return
                time.sleep(0.2)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        threading.Thread(target=kill_later, daemon=True).start()
        return job

    def wait_ended(self, folder: Path, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = read_job(folder)
            if job is None or not alive(job):
                return True
            time.sleep(0.1)
        return False
