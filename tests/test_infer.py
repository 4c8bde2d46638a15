"""`tunesmith infer` on the bundled SmolLM2-135M-Instruct (CPU, fp32); the Generator under it is
tests/test_generate.py.

The CLI runs as users run it: interactive chat through stdin, `--query`, `--adapters` found from args.json,
batch files. Subprocesses cost ~4 s each (imports + a 1.3 s model load), so there are few of them.
"""
# ruff: noqa: F811
# (the `adapted` fixture is imported from smollm_chat; pyflakes sees the tests' `adapted` parameter as a redefinition)

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from smollm_chat import QUESTION, SMOLLM, SYSTEM, adapted, greedy, one_thread, user  # noqa: F401 (fixtures)
from smollm_chat import lora_checkpoint as _lora_checkpoint
from tunesmith import cli
from tunesmith.args import InferArgs
from tunesmith.decode.generator import Generator
from tunesmith.model.load import load_model
from tunesmith.model.lora import lora_modules
from tunesmith.session import load_for_generation

# One OpenMP thread in the subprocesses too (smollm_chat.one_thread says why).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tunesmith(*argv: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", "infer", *argv], input=stdin, capture_output=True,
                          text=True, timeout=300, env=ENV, cwd=cwd)


# ---- the CLI: one query, interactive chat ---------------------------------------------------------------------


@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_query_answers_capital_of_france():
    p = tunesmith("--model", SMOLLM, "--query", "What is the capital of France?", "--temperature", "0",
                  "--max_new_tokens", "16")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_interactive_chat_commands():
    lines = ["What is the capital of France?",
             "multi-line", "What is the capital", "of Italy?#",
             "single-line",
             "clear",
             "reset-system", "You are a pirate named Captain Jack.", "What is your name?",
             "exit",
             "clear"]  # after exit: must never run
    p = tunesmith("--model", SMOLLM, "--temperature", "0", "--max_new_tokens", "16", "--stream", "true",
                  stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    out = p.stdout
    assert "Paris" in out
    assert "Rome" in out.partition("multi-line input: end with")[2]  # the two lines ended by '#' were one question
    assert out.count("history cleared") == 2  # 'clear', and 'reset-system' (nothing after 'exit')
    assert "Captain" in out.partition("system prompt set")[2]  # the new system prompt took effect


@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_chat_drops_oldest_turn_and_ends_at_eof():
    # System + 2 turns is ~66 tokens, + a third question ~90: with 16 new tokens reserved, only the third
    # question overflows --max_length 100.
    questions = ["What is 2+2?", "What is the capital of France?", "What is the capital of Italy?"]
    p = tunesmith("--model", SMOLLM, "--temperature", "0", "--max_new_tokens", "16", "--max_length", "100",
                  "--stream", "false", stdin="\n".join(questions) + "\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count("[the oldest turn was dropped") == 1
    assert out.index("Paris") < out.index("[the oldest turn was dropped") < out.index("Rome")


@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_ctrl_c_stops_the_answer_not_the_program():
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "infer", "--model", SMOLLM, "--temperature", "0",
                             "--max_new_tokens", "400"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            # a suite started in the background (`cmd &`) inherits SIGINT ignored, and so would
                            # the chat: give it the default disposition a terminal gives, so Python's handler is set
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("Write a long story about a dragon.\n")
        proc.stdin.flush()
        seen = ""
        while seen.count("<<< ") < 1 or len(seen.rsplit("<<< ", 1)[1]) < 20:  # 20 characters of the answer
            ch = proc.stdout.read(1)
            assert ch, proc.stderr.read()
            seen += ch
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends, mid-answer (400 tokens take seconds)
        out, err = proc.communicate("What is the capital of France?\nexit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "[stopped]" in out
    assert "Paris" in out  # the chat went on after the stopped answer

# ---- adapters -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_adapter_found_from_checkpoint_answers_like_generator(adapted, smollm):
    ckpt, lm = adapted
    want = Generator(lm).complete(Generator(lm).chat_prompt(user(QUESTION), SYSTEM), greedy(16)).text
    base = Generator(smollm).complete(Generator(smollm).chat_prompt(user(QUESTION), SYSTEM), greedy(16)).text
    assert want != base  # the adapter matters, so equality below means it was applied
    p = tunesmith("--adapters", str(ckpt), "--query", QUESTION, "--temperature", "0", "--max_new_tokens", "16")
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip("\n") == want


@pytest.mark.slow  # over 5 s on 2 cores
def test_merge_lora_gives_identical_greedy_text(adapted, capsys):
    ckpt, lm = adapted
    want = Generator(lm).complete(Generator(lm).chat_prompt(user(QUESTION), SYSTEM), greedy(16)).text
    session = load_for_generation(InferArgs(adapters=[str(ckpt)], merge_lora=True))
    assert session.system == SYSTEM and not lora_modules(session.lm.model)
    del session
    assert cli.main(["infer", "--adapters", str(ckpt), "--merge_lora", "true", "--query", QUESTION,
                     "--temperature", "0", "--max_new_tokens", "16"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want
    # --torch_compile true: the static-cache step path (compiled on a GPU, eager here), same text
    assert cli.main(["infer", "--adapters", str(ckpt), "--merge_lora", "true", "--query", QUESTION,
                     "--temperature", "0", "--max_new_tokens", "16", "--torch_compile", "true"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want


@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_adapter_for_another_base_is_refused_in_one_sentence(qwen_tiny_dir, tmp_path):
    ckpt = tmp_path / "qwen-ckpt"
    _lora_checkpoint(load_model(qwen_tiny_dir), ckpt, seed=1)
    p = tunesmith("--model", SMOLLM, "--adapters", str(ckpt), "--query", "hi", "--max_new_tokens", "4")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "different base model" in err[0], p.stderr


# ---- batch mode -----------------------------------------------------------------------------------------------


def _result_file(stdout: str, folder: Path) -> Path:
    """The one JSONL in folder, which must be the path the command printed."""
    files = list(folder.glob("*.jsonl"))
    printed = Path(stdout.strip().splitlines()[-1].rsplit(" ", 1)[-1])
    assert len(files) == 1 and printed.resolve() == files[0].resolve(), stdout
    return files[0]


def test_batch_prompts_file_with_adapter_writes_into_checkpoint(adapted, tmp_path, capsys):
    ckpt, lm = adapted
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [{"prompt": QUESTION, "reference": "an assistant"},
                                                          {"query": "What is 2+2?"}, "Say hello."]) + "\n")
    assert cli.main(["infer", "--adapters", str(ckpt), "--prompts", str(prompts), "--temperature", "0",
                     "--max_new_tokens", "16"]) == 0
    path = _result_file(capsys.readouterr().out, ckpt / "infer_result")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [QUESTION, "What is 2+2?", "Say hello."]
    assert [r["reference"] for r in rows] == ["an assistant", None, None]
    g = Generator(lm)
    assert rows[0]["response"] == g.complete(g.chat_prompt(user(QUESTION), SYSTEM), greedy(16)).text


def test_batch_val_dataset_writes_prompt_response_reference(tmp_path, monkeypatch, capsys):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
        {"instruction": "Translate to French:", "input": "Good morning", "output": "Bonjour"},
    ], ensure_ascii=False))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["infer", "--model", SMOLLM, "--val_dataset", str(data), "--temperature", "0",
                     "--max_new_tokens", "12"]) == 0
    path = _result_file(capsys.readouterr().out, tmp_path / "output" / "infer_result")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["Paris.", "Bonjour"]
    assert rows[0]["prompt"] == "What is the capital of France?" and "Paris" in rows[0]["response"]
    assert "Good morning" in rows[1]["prompt"] and rows[1]["response"]
