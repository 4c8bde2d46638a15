"""`tunesmith web-ui`: path confinement, the i18n tables, the sft command line it renders, its guards (fast), and
the whole page end to end in Debian's Chromium against a real `tunesmith web-ui` running the real CLI (slow)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tunesmith import args as A
from tunesmith.errors import UserError
from tunesmith.studio import command as C
from tunesmith.studio import data as D
from tunesmith.studio.jobs import Jobs, read_job, status
from tunesmith.studio.paths import Workdir

STATIC = Path(__file__).resolve().parents[1] / "src" / "tunesmith" / "studio" / "static"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


# ---- fast ------------------------------------------------------------------------------------------------

def test_paths_stay_under_the_workdir_and_given_models(tmp_path):
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    wd = Workdir(tmp_path / "wd", [str(models)])
    assert wd.resolve("data/x.jsonl", "file") == wd.root / "data" / "x.jsonl"
    assert wd.resolve(str(wd.root / "runs"), "file") == wd.root / "runs"
    assert wd.resolve(str(models / "m"), "model") == models / "m"  # a given model path: readable
    with pytest.raises(UserError, match=r"^model '\.\./x' contains '\.\.'; give a path inside"):
        wd.resolve("../x", "model")
    with pytest.raises(UserError, match=r"'data/\.\./\.\./etc' contains '\.\.'"):
        wd.resolve("data/../../etc", "file")
    with pytest.raises(UserError, match=r"^file '/etc/passwd' is outside the folders this studio may read"):
        wd.resolve("/etc/passwd", "file")
    with pytest.raises(UserError, match="outside the folders this studio may write"):
        wd.resolve(str(models / "m"), "output", write=True)  # model paths are read only
    (wd.root / "link").symlink_to("/etc")
    with pytest.raises(UserError, match="outside"):  # a symlink out of the workdir is followed, then refused
        wd.resolve("link/passwd", "file")
    assert wd.model("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert wd.upload_path("../../evil name.jsonl") == wd.data / "evil_name.jsonl"
    with pytest.raises(UserError, match=r"^file 'a\.exe' is not \.json, \.jsonl, \.csv or \.parquet"):
        wd.upload_path("a.exe")


def test_i18n_tables_have_the_same_keys_and_cover_the_page():
    en = json.loads((STATIC / "i18n" / "en.json").read_text(encoding="utf-8"))
    zh = json.loads((STATIC / "i18n" / "zh.json").read_text(encoding="utf-8"))
    assert set(en) == set(zh)
    assert all(v.strip() for v in [*en.values(), *zh.values()])
    html, js = (STATIC / "index.html").read_text(), (STATIC / "studio.js").read_text()
    used = set(re.findall(r'data-i18n(?:-placeholder)?="([^"]+)"', html))
    used |= set(re.findall(r'\bt\("([^"$`]+)"', js))
    used |= {f"state.{s}" for s in ("starting", "training", "checking", "running", "done", "stopped", "failed")}
    used |= {f"preset.{p}_hint" for p in ("quick", "balanced", "custom")}
    used |= {f"mode.{m}" for m in ("lora", "lean", "4bit", "4bit-lean", "full", "full-lean")}
    assert used - set(en) == set()
    for v_en, k in ((en[k], k) for k in en):  # placeholders agree between the languages
        assert set(re.findall(r"\{\w+\}", v_en)) == set(re.findall(r"\{\w+\}", zh[k])), k
    fields = {f["name"] for f in C.sft_fields()} - {"dataset"}
    assert {f"flag.{n}" for n in fields} <= set(en)  # every flag of the custom form has its help in both


def test_command_line_renders_what_the_cli_parses():
    flags = {"model": "smollm2-135m-instruct", "dataset": ["self-cognition", "data/my file.jsonl"],
             "model_name": ["小智", "Nova"], "model_author": ["张三", "Ann"], "max_steps": 12, "learning_rate": 1e-3,
             "lora_rank": 8, "gradient_checkpointing": False, "packing": None, "target_modules": ["q_proj", "v_proj"],
             "num_train_epochs": 3.0, "output_dir": "runs/r1", "add_version": False}
    argv = C.render(flags)
    assert argv[:2] == ["tunesmith", "sft"]
    assert "--lora_rank" not in argv and "--num_train_epochs" not in argv and "--packing" not in argv  # defaults
    assert C.display(argv).startswith("tunesmith sft --model smollm2-135m-instruct --dataset self-cognition "
                                      "'data/my file.jsonl'")
    assert "--gradient_checkpointing false" in C.display(argv) and "--add_version false" in C.display(argv)
    parsed = C.parse(argv)
    want = dataclasses.replace(A.SftArgs(), **{k: v for k, v in flags.items() if v is not None})
    assert parsed == want
    with pytest.raises(UserError, match=r"^--lora_rank 0: it must be at least 1\.$"):
        C.parse(C.render({**flags, "lora_rank": 0}))
    with pytest.raises(UserError, match=r"invalid choice: 'bogus'.*; fix that value on the Train page\.$"):
        C.parse(C.render({**flags, "lr_scheduler_type": "bogus"}))
    with pytest.raises(UserError, match=r"^unknown sft flag --learning_rat;"):
        C.render({"learning_rat": 1})


def test_bad_rows_get_the_clis_sentences_and_mapping_cleans_a_copy(tmp_path):
    from tunesmith.data.sources import load_dataset

    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "hi", "output": "hello"}\n{"q": "who?", "a": "me"}\n'
                 '{"instruction": "x", "output": ""}\n', encoding="utf-8")
    r = D.inspect(f, str(f))
    assert (r["total"], r["good"], [b["row"] for b in r["bad"]]) == (3, 1, [2, 3])
    with pytest.raises(UserError) as cli:
        load_dataset(str(f), 0)
    assert r["bad"][0]["error"] == str(cli.value)  # the CLI stops at the first bad row, with the same sentence
    m = D.inspect(f, "data/d.jsonl", {"q": "query", "a": "response"})
    assert (m["good"], [b["row"] for b in m["bad"]], m["dataset"]) == (2, [3], "data/d.clean.jsonl")
    clean = load_dataset(str(tmp_path / "d.clean.jsonl"), 0)
    assert clean[1] == [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "me"}]
    with pytest.raises(UserError, match="column mapping target 'answer' is not one of"):
        D.inspect(f, "data/d.jsonl", {"a": "answer"})


@pytest.mark.slow  # starts subprocesses
def test_one_job_per_folder_stop_and_reattach(tmp_path):
    jobs = Jobs(tmp_path)
    folder = tmp_path / "job"
    jobs.start(folder, "test", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    with pytest.raises(UserError, match=r"^job is still running \(pid \d+\); stop it before starting another"):
        jobs.start(folder, "test", ["true"])
    assert status(folder)["state"] == "running"
    while "up" not in status(folder)["tail"]:
        time.sleep(0.05)
    # another studio process (a restart) finds it running from job.json alone
    assert status(folder, read_job(folder))["state"] == "running"
    jobs.stop(folder)
    assert jobs.wait_ended(folder, 20)
    deadline = time.time() + 10
    while read_job(folder).get("rc") is None and time.time() < deadline:
        time.sleep(0.05)
    st = status(folder)
    assert st["state"] == "stopped" and st["error"] is None and "up" in st["tail"]
    failing = tmp_path / "bad"
    jobs.start(failing, "test", [sys.executable, "-c", "import sys; print('error: the data is bad; fix it.', "
                                                       "file=sys.stderr); sys.exit(1)"])
    assert jobs.wait_ended(failing, 20)
    while read_job(failing).get("rc") is None:
        time.sleep(0.05)
    assert status(failing)["error"] == "the data is bad; fix it."


def test_non_loopback_host_needs_a_key_and_every_route_checks_it(tmp_path):
    from fastapi.testclient import TestClient

    from tunesmith.commands.web_ui import web_ui
    from tunesmith.studio.app import create_app

    with pytest.raises(UserError, match=r"^--host 0\.0\.0\.0 lets other machines reach the studio.*needs --api_key"):
        web_ui(A.WebUIArgs(host="0.0.0.0", workdir=str(tmp_path / "w")))
    app = create_app(Workdir(tmp_path / "w"), api_key="s3cret")
    c = TestClient(app, base_url="http://studio.example:7860")  # a non-loopback name: the key guards it
    for path in ("/", "/api/runs", "/static/studio.js", "/api/config"):
        r = c.get(path)
        assert r.status_code == 401 and "needs its key" in r.json()["error"]["message"], path
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).json() == {"runs": []}
    r = c.get("/?key=s3cret", follow_redirects=False)
    assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"]
    assert c.get("/api/runs").status_code == 200  # the cookie now carries the key
    keyless = TestClient(create_app(Workdir(tmp_path / "w")), base_url="http://studio.example:7860")
    assert keyless.get("/api/runs").status_code == 403  # no key: loopback Host names only
    local = TestClient(create_app(Workdir(tmp_path / "w")), base_url="http://127.0.0.1:7860")
    r = local.post("/api/command", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415  # no cross-site form posts
    r = local.post("/api/upload?name=x.jsonl", content=b"{}", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and (tmp_path / "w" / "data" / "x.jsonl").is_file()
    r = local.post("/api/files/inspect", json={"file": "/etc/passwd"})
    assert r.status_code == 400 and "outside the folders" in r.json()["error"]["message"]


# ---- slow: the page end to end ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(workdir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "web-ui", "--workdir", str(workdir), "--port",
                             str(port), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/config", timeout=2,
                         headers={"Authorization": f"Bearer {extra[-1]}"} if "--api_key" in extra else {}
                         ).status_code in (200, 401):
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("web-ui did not start")


def end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def kill_jobs(workdir: Path) -> None:
    """The jobs this test's studio started (pids from their job.json), so none outlives the test."""
    from tunesmith.studio.jobs import alive

    for f in list(workdir.glob("runs/*/job.json")) + list(workdir.glob(".studio/jobs/*/job.json")):
        job = json.loads(f.read_text())
        if alive(job):
            os.killpg(job["pid"], signal.SIGKILL)


def more_points(points, n: int, timeout: float = 60) -> None:
    """Wait until the chart shows more than n points (the page's CSP rules out wait_for_function's eval)."""
    deadline = time.time() + timeout
    while points.count() <= n:
        assert time.time() < deadline, f"the chart stayed at {n} points"
        time.sleep(0.25)


@pytest.mark.slow
def test_studio_end_to_end(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    assert os.path.exists(CHROMIUM), "no chromium binary (apt-get install -y chromium)"
    expect = sync_api.expect
    shots = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    workdir, port = tmp_path / "studio", free_port()
    url = f"http://127.0.0.1:{port}/"

    # refusals at start: a non-loopback host without a key
    r = subprocess.run([sys.executable, "-m", "tunesmith", "web-ui", "--host", "0.0.0.0", "--workdir", str(workdir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: --host 0.0.0.0 lets other machines reach the studio")

    studio = start_studio(workdir, port)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900}, locale="en-US")
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)

            # 1. model: the bundled model's facts; a path outside the workdir is refused in one sentence
            expect(page.locator("#model-info")).to_contain_text("LlamaForCausalLM", timeout=30_000)
            expect(page.locator("#model-info")).to_contain_text("SmolLM")
            page.fill("#model-path", "/etc")
            page.click("#model-load")
            expect(page.locator("#error")).to_contain_text("'/etc' is outside the folders this studio may read")
            page.fill("#model-path", "smollm2-135m-instruct")
            page.click("#model-load")
            expect(page.locator("#error")).to_be_hidden()

            # 2. identity and data
            page.click("#tab-data")
            page.fill("#name-zh", "小诺")
            page.fill("#name-en", "Nova")
            page.fill("#author-zh", "星辰实验室")
            page.fill("#author-en", "Star Lab")
            expect(page.locator("#identity-rows")).to_contain_text("星辰实验室", timeout=10_000)
            expect(page.locator("#identity-rows")).to_contain_text("小诺")
            upload = tmp_path / "extra.jsonl"
            rows = [{"query": f"What do you like, {i}?", "response": f"I am Nova and I like number {i}."} for i in range(8)]
            upload.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + '{"query": "empty answer", '
                              '"response": ""}\n' + "".join(json.dumps(r) + "\n" for r in rows[3:]), encoding="utf-8")
            page.set_input_files("#file-input", str(upload))
            bad = page.locator(".bad-rows .bad-row")
            expect(bad).to_have_count(1, timeout=20_000)
            expect(bad).to_have_text("data/extra.jsonl line 4, field 'response' is empty; write the answer the "
                                     "model should learn there.")
            expect(page.locator(".file-summary")).to_contain_text("8 of 9 rows usable")
            page.click("#check-data")
            expect(page.locator("#totals-table")).to_contain_text("128", timeout=60_000)  # 120 + 8 conversations
            page.screenshot(path=str(shots / "studio-data-en.png"), full_page=True)

            # 3. train: a short custom run; the command shown is the one that runs
            page.click("#tab-train")
            page.check("#preset-custom")
            page.click("#custom-box summary")
            for flag, value in (("max_steps", "14"), ("gradient_accumulation_steps", "2"), ("save_steps", "4"),
                                ("max_length", "256"), ("learning_rate", "0.001"), ("logging_steps", "1")):
                page.fill(f"[data-flag={flag}]", value)
                page.dispatch_event(f"[data-flag={flag}]", "change")
            expect(page.locator("#command")).to_contain_text("--max_steps 14", timeout=10_000)
            command = page.text_content("#command")
            assert "--dataset self-cognition data/extra.clean.jsonl" in command
            assert "--model_name '小诺' Nova" in command and "--model_author '星辰实验室' 'Star Lab'" in command

            # the estimate for this run, measured by a probe
            page.click("#tab-model")
            page.click("#estimate")
            expect(page.locator("#estimate-time")).to_be_visible(timeout=120_000)
            assert "CPU" in page.text_content("#estimate-why")
            expect(page.locator("#estimate-modes tr.chosen")).to_contain_text("LoRA")
            page.screenshot(path=str(shots / "studio-model-en.png"), full_page=True)

            page.click("#tab-train")
            page.fill("#run-name", "nova")
            page.click("#start")
            expect(page.locator("#run-state")).to_have_text(re.compile("starting|training"), timeout=20_000)
            run_id = page.text_content("#run-id")
            argv = json.loads((workdir / "runs" / run_id / "job.json").read_text())["argv"]
            expect(page.locator("#run-cmd")).to_have_text(C.display(argv))
            assert argv[argv.index("--max_steps") + 1] == "14" and argv[argv.index("--output_dir") + 1] == f"runs/{run_id}"
            points = page.locator("#chart .loss-pt")
            expect(points).not_to_have_count(0, timeout=90_000)  # from the first logged step
            first = points.count()
            more_points(points, first)

            # a page reload mid-run, and a restart of web-ui: the run is still live
            page.reload()
            expect(page.locator("#run-state")).to_have_text("training", timeout=20_000)
            end(studio)
            studio = start_studio(workdir, port)
            page.reload()
            expect(page.locator("#run-id")).to_have_text(run_id, timeout=20_000)
            expect(page.locator("#run-state")).to_have_text("training")
            n = page.locator("#chart .loss-pt").count()
            more_points(page.locator("#chart .loss-pt"), n)
            expect(page.locator("#resume-from option")).not_to_have_count(0, timeout=60_000)  # a checkpoint exists
            page.screenshot(path=str(shots / "studio-train-en.png"), full_page=True)

            # stop, then resume from the checkpoint
            page.click("#stop")
            expect(page.locator("#run-state")).to_have_text("stopped", timeout=30_000)
            stopped_at = page.locator("#chart .loss-pt").count()
            assert stopped_at < 14
            resume_from = page.input_value("#resume-from")
            page.click("#resume")
            expect(page.locator("#run-state")).to_have_text(re.compile("starting|training"), timeout=20_000)
            expect(page.locator("#run-cmd")).to_contain_text(f"--resume_from_checkpoint runs/{run_id}/{resume_from}")
            expect(page.locator("#m-step")).to_have_text("14 / 14", timeout=120_000)
            expect(page.locator("#run-state")).to_have_text(re.compile("checking identity|done"), timeout=60_000)
            expect(page.locator("#chart .loss-pt")).to_have_count(14)

            # 4. check: side-by-side chat while the identity check runs after training
            ckpt = f"runs/{run_id}/checkpoint-14"
            page.click("#tab-check")
            page.select_option("#check-ckpt", ckpt)
            page.click("#chat-start")
            expect(page.locator("#chat-state")).to_have_text("ready", timeout=120_000)
            page.fill("#chat-input", "Who are you?")
            page.press("#chat-input", "Enter")
            for which in ("base", "tuned"):
                answer = page.locator(f"#chat-{which} .msg.assistant")
                expect(answer).to_have_count(1)
                expect(answer).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=120_000)
                assert answer.text_content().strip()

            # 5. ship: export the merged model + GGUF, then serve it
            page.click("#tab-ship")
            page.select_option("#ship-ckpt", ckpt)
            page.select_option("#gguf-type", "q8_0")
            page.click("#export")
            expect(page.locator("#export-state")).to_contain_text("Written to", timeout=240_000)
            merged = workdir / f"{ckpt}-merged"
            assert list(merged.glob("*.gguf")) and (merged / "Modelfile").is_file()
            serve_port = free_port()
            page.fill("#serve-port", str(serve_port))
            page.click("#serve")
            expect(page.locator("#snippets")).to_be_visible(timeout=120_000)
            snippet = page.text_content("#snippets")
            assert f"http://127.0.0.1:{serve_port}/v1/chat/completions" in snippet
            name = re.search(r'"model": "([^"]+)"', snippet).group(1)
            r = httpx.post(f"http://127.0.0.1:{serve_port}/v1/chat/completions", timeout=120,
                           json={"model": name, "messages": [{"role": "user", "content": "Who are you?"}],
                                 "max_tokens": 16})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip()
            page.screenshot(path=str(shots / "studio-ship-en.png"), full_page=True)

            # 4. the report the run wrote when it ended
            page.click("#tab-train")
            expect(page.locator("#run-state")).to_have_text("done", timeout=300_000)
            assert (workdir / ckpt / "eval" / "eval.json").is_file()
            page.click("#tab-check")
            page.select_option("#check-ckpt", ckpt)
            page.click("#report-open")
            expect(page.locator("#report-identity")).to_contain_text("zh", timeout=20_000)
            expect(page.locator("#report-kl")).to_contain_text("mean KL")
            expect(page.locator("#report img.plot")).to_be_visible()
            page.screenshot(path=str(shots / "studio-check-en.png"), full_page=True)

            # every page in Chinese too
            page.select_option("#lang", "zh")
            expect(page.locator("#tab-model")).to_have_text("1 · 模型")
            for tab in ("model", "data", "train", "check", "ship"):
                page.click(f"#tab-{tab}")
                page.screenshot(path=str(shots / f"studio-{tab}-zh.png"), full_page=True)
            page.click("#tab-data")
            page.screenshot(path=str(shots / "studio-data-zh.png"), full_page=True)
            assert errors == []
            browser.close()

        # a request without the key to a studio started with one
        key_port = free_port()
        keyed = start_studio(tmp_path / "keyed", key_port, "--api_key", "k3y")
        try:
            r = httpx.get(f"http://127.0.0.1:{key_port}/api/runs")
            assert r.status_code == 401 and "needs its key" in r.json()["error"]["message"]
            assert httpx.get(f"http://127.0.0.1:{key_port}/api/runs", headers={"Authorization": "Bearer k3y"}
                             ).status_code == 200
        finally:
            end(keyed)
    finally:
        end(studio)
        kill_jobs(workdir)
