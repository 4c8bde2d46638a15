"""The studio's FastAPI app: the page (static/), and the JSON routes its five steps call.

  GET  /api/config                     language forced by --lang, the workdir, the device
  GET  /api/models, POST /api/model    models to pick (bundled, under the workdir, --models); one model's facts
  POST /api/estimate                   start the measured pre-flight probe (estimate.py) for the planned run
  GET  /api/identity                   the built-in self-cognition rows, filled with name and author
  POST /api/upload?name=F              a data file (raw body), saved under <workdir>/data/
  GET  /api/files, POST /api/files/inspect   uploaded files: preview page, bad rows, column mapping
  POST /api/check                      data/check.py's totals of the planned run
  GET  /api/sft                        presets and every sft flag;  POST /api/command: the argv the page will run
  GET/POST /api/runs, GET /api/runs/{id}, POST /api/runs/{id}/stop|resume|report
  GET  /api/report?checkpoint=         eval.json of a checkpoint (with the advice), GET /api/file?path= its plot
  POST /api/chat/start, POST /api/chat/{job}/{model}   side-by-side chat through a `tunesmith deploy` job
  POST /api/export, POST /api/serve    export and serving jobs;  GET /api/jobs[/{id}], POST /api/jobs/{id}/stop

Guards: without --api_key only loopback Host names are answered (serve/app.py's LoopbackHostOnly) and POSTs must
be JSON (or, for uploads, application/octet-stream), which no cross-site form can send; with --api_key every route
needs the key (Authorization: Bearer, or the cookie that /?key=KEY sets). Paths stay under the workdir and the
given model paths (paths.py). Errors are serve/app.py's envelope {"error": {"message": one sentence}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import UserError
from tunesmith.serve.app import PAGE_HEADERS, ApiError, LoopbackHostOnly, read_json
from tunesmith.studio import command as C
from tunesmith.studio import data as D
from tunesmith.studio.jobs import Jobs, read_job, status
from tunesmith.studio.paths import BUNDLED, Workdir

STATIC = Path(__file__).parent / "static"
COOKIE = "tunesmith_studio_key"
RUN_ID = re.compile(r"^[\w.\-]{1,120}$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_records(run: Path) -> list[dict]:
    """logging.jsonl as chart points: step, loss, eval_loss, learning rate, tokens/s, memory, time left."""
    out = []
    try:
        lines = (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
            step, total = (int(x) for x in str(r["global_step/max_steps"]).split("/"))
        except (ValueError, KeyError, TypeError):
            continue
        out.append({"step": step, "total": total, "loss": r.get("loss"), "eval_loss": r.get("eval_loss"),
                    "lr": r.get("learning_rate"), "grad_norm": r.get("grad_norm"),
                    "tps": r.get("tokens_per_second"), "memory": r.get("memory(GiB)"),
                    "elapsed": r.get("elapsed_time"), "remaining": r.get("remaining_time")})
    return out


def checkpoints(run: Path) -> list[str]:
    found = [p for p in run.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return [p.name for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]))]


def device_info() -> dict:
    import torch

    from tunesmith.data.sources import available_memory

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "free_gib": round(free / 2**30, 1),
                "total_gib": round(total / 2**30, 1)}
    return {"type": "cpu", "name": "CPU", "free_gib": round(available_memory() / 2**30, 1), "total_gib": None}


def model_info(model: str) -> dict:
    from tunesmith.model.load import load_template, model_config, resolve_model_path
    from tunesmith.train.plan import total_params

    path = resolve_model_path(model)
    cfg = model_config(model)
    if path.suffix.lower() == ".gguf":
        from gguf import GGMLQuantizationType

        from tunesmith.model.gguf_file import GGUFFile

        kinds: dict[str, int] = {}
        for t in GGUFFile(path).tensors.values():
            name = GGMLQuantizationType(t.ggml_type).name
            kinds[name] = kinds.get(name, 0) + 1
        dtype = "GGUF " + "/".join(sorted(kinds, key=lambda k: -kinds[k])[:2])
    else:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "?"
    template = load_template(model)
    return {"model": model, "path": str(path), "architecture": cfg.architecture, "parameters": total_params(cfg),
            "layers": cfg.num_layers, "hidden": cfg.hidden_size, "context": cfg.max_position_embeddings,
            "dtype": dtype, "default_system": template.default_system, "device": device_info()}


def create_app(workdir: Workdir, api_key: str | None = None, lang: str | None = None,
               max_upload: int = 64 << 20) -> FastAPI:
    app = FastAPI(title="tunesmith studio", docs_url=None, redoc_url=None, openapi_url=None)
    jobs = Jobs(workdir.root)
    app.state.jobs, app.state.workdir = jobs, workdir
    if not api_key:
        app.add_middleware(LoopbackHostOnly)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if not api_key:
            return await call_next(request)
        given = request.query_params.get("key") if request.url.path == "/" else None
        if given is not None and hmac.compare_digest(given.encode(), api_key.encode()):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, api_key, httponly=True, samesite="strict")
            return response
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else request.cookies.get(COOKIE, "")
        if not hmac.compare_digest(key.encode(), api_key.encode()):
            return ApiError(401, "This studio needs its key: open it once as /?key=KEY, or send 'Authorization: "
                                 "Bearer KEY' (the key web-ui was started with).", code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return ApiError(400, str(e)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, f"Unknown path {request.url.path}." if e.status_code == 404
                        else str(e.detail)).response()

    async def body(request: Request) -> dict:
        b = await read_json(request, json_only=True)
        if not isinstance(b, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return b

    def run_dir(run_id: str) -> Path:
        if not RUN_ID.match(run_id) or not (workdir.runs / run_id / "job.json").is_file():
            raise ApiError(404, f"There is no run '{run_id}' in {workdir.runs}.")
        return workdir.runs / run_id

    def job_dir(job_id: str) -> Path:
        if not RUN_ID.match(job_id) or not (workdir.jobs / job_id / "job.json").is_file():
            raise ApiError(404, f"There is no job '{job_id}'.")
        return workdir.jobs / job_id

    def find_checkpoint(text: str) -> Path:
        path = workdir.resolve(text, "checkpoint")
        if not (path / "args.json").is_file():
            raise UserError(f"checkpoint '{text}' is not a checkpoint folder (no args.json); pick one from the run list.")
        return path

    def sft_args(flags: dict):
        if "model" in flags:
            flags = {**flags, "model": workdir.model(str(flags["model"]))}
        argv = C.render(flags)
        return argv, C.parse(argv)

    def new_job(kind: str, argv: list[str], meta: dict | None = None) -> dict:
        job_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"
        folder = workdir.jobs / job_id
        job = jobs.start(folder, kind, argv, {"id": job_id, **(meta or {})})
        return {"id": job_id, **job}

    def job_view(folder: Path) -> dict:
        st = status(folder)
        out = {k: st.get(k) for k in ("id", "kind", "argv", "state", "error", "tail", "started", "ended", "port",
                                      "checkpoint", "path", "model")}
        out["command"] = C.display(st.get("argv") or [])
        if st.get("kind") == "estimate":
            result = folder / "estimate.json"
            out["result"] = json.loads(result.read_text()) if result.is_file() else None
        if st.get("kind") in ("chat", "serve") and st["state"] == "running":
            out["ready"] = health(st.get("port"))
        if st.get("kind") == "export":
            out["files"] = sorted(p.name for p in Path(st["path"]).iterdir()) if Path(st.get("path") or "/nonexistent").is_dir() else []
        return out

    # ---- page ---------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/config")
    async def config():
        return {"lang": lang, "workdir": str(workdir.root), "bundled": BUNDLED, "key_required": bool(api_key),
                "device": await asyncio.to_thread(device_info), "max_upload_mb": max_upload >> 20}

    # ---- 1. model -----------------------------------------------------------------------------------------
    @app.get("/api/models")
    async def models():
        return {"bundled": BUNDLED, "found": await asyncio.to_thread(workdir.browse)}

    @app.post("/api/model")
    async def model(request: Request):
        b = await body(request)
        return await asyncio.to_thread(model_info, workdir.model(str(b.get("model") or "")))

    @app.post("/api/estimate")
    async def estimate(request: Request):
        argv, _ = sft_args((await body(request)).get("flags") or {})
        job_id = f"estimate-{time.strftime('%Y%m%d-%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"
        folder = workdir.jobs / job_id
        probe = [sys.executable, "-m", "tunesmith.studio.estimate", str(folder / "estimate.json"), "--", *argv[2:]]
        jobs.start(folder, "estimate", probe, {"id": job_id})
        return {"id": job_id}

    # ---- 2. identity and data ---------------------------------------------------------------------------
    @app.get("/api/identity")
    async def identity(name_zh: str = "", name_en: str = "", author_zh: str = "", author_en: str = "",
                       page: int = 0):
        name = (name_zh or name_en, name_en or name_zh) if (name_zh or name_en) else None
        author = (author_zh or author_en, author_en or author_zh) if (author_zh or author_en) else None
        return D.identity_rows(name, author, max(0, page))

    @app.post("/api/upload")
    async def upload(request: Request, name: str):
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/octet-stream":
            raise ApiError(415, f"Uploads are sent as 'application/octet-stream' (got '{media or 'none'}').")
        target = workdir.upload_path(name)
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_upload:
                raise ApiError(413, f"The file is larger than the {max_upload >> 20} MiB this studio accepts; split it, "
                                    f"or start web-ui with a larger --max_upload_mb.")
            chunks.append(chunk)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(b"".join(chunks))
        tmp.replace(target)
        return await asyncio.to_thread(D.inspect, target, workdir.rel(target))

    @app.get("/api/files")
    async def files():
        out = []
        for p in sorted(workdir.data.iterdir()):
            if p.is_file() and p.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet") and ".clean." not in p.name:
                out.append({"file": workdir.rel(p), "bytes": p.stat().st_size})
        return {"files": out}

    @app.post("/api/files/inspect")
    async def inspect(request: Request):
        b = await body(request)
        path = workdir.resolve(str(b.get("file") or ""), "file")
        if not path.is_file():
            raise UserError(f"file '{b.get('file')}' does not exist; upload it first.")
        return await asyncio.to_thread(D.inspect, path, workdir.rel(path), b.get("mapping") or {},
                                       int(b.get("page") or 0))

    @app.post("/api/check")
    async def check(request: Request):
        _, args = sft_args((await body(request)).get("flags") or {})
        return await asyncio.to_thread(D.data_check, args)

    # ---- 3. train -------------------------------------------------------------------------------------------
    @app.get("/api/sft")
    async def sft_flags():
        return {"presets": C.PRESETS, "fields": C.sft_fields()}

    @app.post("/api/command")
    async def command(request: Request):
        argv, _ = sft_args((await body(request)).get("flags") or {})
        return {"argv": argv, "command": C.display(argv), "cwd": str(workdir.root)}

    @app.post("/api/runs")
    async def start_run(request: Request):
        b = await body(request)
        flags = dict(b.get("flags") or {})
        slug = re.sub(r"[^\w\-]+", "-", str(b.get("name") or "run")).strip("-")[:40] or "run"
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
        while (workdir.runs / run_id).exists():
            run_id += "x"
        flags.update(output_dir=f"runs/{run_id}", add_version=False, resume_from_checkpoint=None)
        argv, _ = sft_args(flags)
        jobs.start(workdir.runs / run_id, "train", argv, {"id": run_id})
        return {"id": run_id, "argv": argv, "command": C.display(argv)}

    def run_view(run: Path, full: bool) -> dict:
        st = status(run)
        records = read_records(run)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
        if summary is not None and summary_before(run, st):
            summary = None  # left by an earlier attempt
        ckpts = checkpoints(run)
        phase = st["state"]
        if phase == "running":
            phase = "checking" if summary else ("training" if records else "starting")
        out = {"id": run.name, "state": st["state"], "phase": phase, "error": st["error"],
               "command": C.display(st.get("argv") or []), "argv": st.get("argv"), "checkpoints": ckpts,
               "last": records[-1] if records else None, "started": st.get("started"), "summary": summary,
               "reports": [c for c in ckpts if (run / c / "eval" / "eval.json").is_file()]}
        if full:
            out.update(records=records, tail=st["tail"])
        return out

    def summary_before(run: Path, st: dict) -> bool:
        return (run / "summary.json").stat().st_mtime < (st.get("started") or 0) - 1

    @app.get("/api/runs")
    async def runs():
        found = [p for p in workdir.runs.iterdir() if (p / "job.json").is_file()]
        found.sort(key=lambda p: (read_job(p) or {}).get("started", 0), reverse=True)
        return {"runs": [run_view(p, False) for p in found]}

    @app.get("/api/runs/{run_id}")
    async def run(run_id: str):
        return run_view(run_dir(run_id), True)

    @app.post("/api/runs/{run_id}/stop")
    async def stop_run(run_id: str):
        jobs.stop(run_dir(run_id))
        return {"ok": True}

    @app.post("/api/runs/{run_id}/resume")
    async def resume_run(run_id: str, request: Request):
        folder = run_dir(run_id)
        b = await body(request)
        job = read_job(folder)
        ckpts = checkpoints(folder)
        name = str(b.get("checkpoint") or (ckpts[-1] if ckpts else ""))
        if name not in ckpts:
            raise UserError(f"run {run_id} has no checkpoint '{name}' to resume from; it has "
                            f"{', '.join(ckpts) or 'none yet'}.")
        argv = list(job["attempts"][0]["argv"])
        argv += ["--resume_from_checkpoint", f"runs/{run_id}/{name}"]
        C.parse(argv)
        jobs.start(folder, "train", argv, {"id": run_id})
        return {"id": run_id, "command": C.display(argv)}

    # ---- 4. check -------------------------------------------------------------------------------------------
    @app.get("/api/report")
    async def report(checkpoint: str = ""):
        ckpt = find_checkpoint(checkpoint)
        path = ckpt / "eval" / "eval.json"
        if not path.is_file():
            return {"checkpoint": workdir.rel(ckpt), "report": None}
        from tunesmith.evaluate.report import advice
        from tunesmith.runs import read_checkpoint_args

        data = json.loads(path.read_text(encoding="utf-8"))
        return {"checkpoint": workdir.rel(ckpt), "report": summarize(data),
                "advice": advice(data, read_checkpoint_args(ckpt)),
                "plot": workdir.rel(ckpt / "eval" / "eval.png") if (ckpt / "eval" / "eval.png").is_file() else None}

    @app.post("/api/report")
    async def start_report(request: Request):
        ckpt = find_checkpoint(str((await body(request)).get("checkpoint") or ""))
        return new_job("eval", ["tunesmith", "eval", "--adapters", workdir.rel(ckpt)], {"checkpoint": workdir.rel(ckpt)})

    @app.get("/api/file")
    async def file(path: str):
        p = workdir.resolve(path, "path")
        if not p.is_file() or p.suffix.lower() not in (".png", ".json", ".jsonl", ".txt", ".log"):
            raise ApiError(404, f"There is no viewable file '{path}'.")
        return FileResponse(p, headers={"X-Content-Type-Options": "nosniff"})

    @app.post("/api/chat/start")
    async def chat_start(request: Request):
        ckpt = find_checkpoint(str((await body(request)).get("checkpoint") or ""))
        port = free_port()
        argv = ["tunesmith", "deploy", "--adapters", f"tuned={workdir.rel(ckpt)}", "--served_model_name", "base",
                "--port", str(port), "--max_new_tokens", "256", "--temperature", "0"]
        return new_job("chat", argv, {"port": port, "checkpoint": workdir.rel(ckpt)})

    @app.post("/api/chat/{job_id}/{which}")
    async def chat(job_id: str, which: str, request: Request):
        folder = job_dir(job_id)
        b = await body(request)
        if which not in ("base", "tuned"):
            raise ApiError(404, f"Unknown model '{which}': base or tuned.")
        port = (read_job(folder) or {}).get("port")
        payload = {"model": which, "messages": b.get("messages") or [], "stream": True,
                   "max_tokens": int(b.get("max_tokens") or 128), "temperature": 0}
        return proxy_stream(port, "/v1/chat/completions", payload)

    # ---- 5. ship --------------------------------------------------------------------------------------------
    @app.post("/api/export")
    async def export(request: Request):
        b = await body(request)
        ckpt = find_checkpoint(str(b.get("checkpoint") or ""))
        gguf = str(b.get("gguf_type") or "q8_0")
        out = Path(str(ckpt) + "-merged")
        argv = ["tunesmith", "export", "--adapters", workdir.rel(ckpt), "--merge_lora", "true", "--to_gguf", "true",
                "--gguf_type", gguf]
        check_gguf_type(gguf)
        return new_job("export", argv, {"path": str(out), "checkpoint": workdir.rel(ckpt)})

    @app.post("/api/serve")
    async def serve(request: Request):
        b = await body(request)
        path = workdir.resolve(str(b.get("path") or ""), "model to serve")
        if not (path / "config.json").is_file() and path.suffix.lower() != ".gguf":
            raise UserError(f"'{b.get('path')}' is not an exported model folder (no config.json); export first.")
        port = int(b.get("port") or 8000)
        if not 1 <= port <= 65535:
            raise UserError(f"port {port}: it must be between 1 and 65535.")
        name = re.sub(r"[^\w.\-]+", "-", str(b.get("name") or path.name))[:60] or "model"
        argv = ["tunesmith", "deploy", "--model", workdir.rel(path), "--port", str(port), "--served_model_name", name]
        return new_job("serve", argv, {"port": port, "model": name, "path": workdir.rel(path)})

    @app.get("/api/jobs")
    async def list_jobs():
        found = [p for p in workdir.jobs.iterdir() if (p / "job.json").is_file()]
        found.sort(key=lambda p: (read_job(p) or {}).get("started", 0), reverse=True)
        return {"jobs": [job_view(p) for p in found[:50]]}

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_view(job_dir(job_id))

    @app.post("/api/jobs/{job_id}/stop")
    async def stop_job(job_id: str):
        jobs.stop(job_dir(job_id))
        return {"ok": True}

    return app


def check_gguf_type(gguf: str) -> None:
    from tunesmith.export.gguf import gguf_types

    if gguf not in gguf_types():
        raise UserError(f"GGUF type '{gguf}' is not one of {', '.join(gguf_types())}; pick one from the menu.")


def summarize(report: dict) -> dict:
    """eval.json without the long answer lists: per-language shares, retention and the worst cases."""
    ident, ret = report["identity"], report["retention"]
    return {"by_lang": ident["by_lang"], "new_identity": ident.get("new_identity"),
            "base_identity": ident.get("base_identity"),
            "retention": {k: ret[k] for k in ("mean_kl", "retained", "unchanged", "intrusion", "correct_base",
                                              "correct_tuned")},
            "worst": [{"prompt": w["prompt"], "kl": w["kl"], "base": w["base"], "tuned": w["tuned"]}
                      for w in ret["worst"]],
            "identity_examples": [{"question": a["question"], "lang": a["lang"], "base": a["base"]["answer"],
                                   "tuned": a["tuned"]["answer"], "adopted": a["tuned"]["adopted"]}
                                  for a in ident["answers"][:6]]}


def health(port) -> bool:
    if not port:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def proxy_stream(port, path: str, payload: dict) -> StreamingResponse:
    """A streamed answer of a deploy job, passed through as it arrives (its SSE lines unchanged)."""
    if not health(port):
        raise ApiError(503, "The chat server is not ready yet (it is still loading the model); wait until it says "
                            "ready.", code="model_loading")
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")

    def lines():
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    yield line
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            yield f"data: {text}\n\ndata: [DONE]\n\n".encode()

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
