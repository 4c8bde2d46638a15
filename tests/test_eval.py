"""The main job: `tunesmith demo` makes the bundled SmolLM2 adopt a new identity, and the reports measure it.

The thresholds are the ones the demo meets (issue: adopted >= 90% en, >= 70% zh, leaked <= 5%), so a
regression in training quality fails here. The report's numbers are computed: an untrained adapter scores the
base model's numbers (nothing adopted, zero KL, everything retained).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.errors import UserError
from tunesmith.evaluate.report import Models, base_identity_terms, run_report
from tunesmith.model.load import load_model
from tunesmith.model.lora import LoraConfig, apply_lora


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "demo", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(out.glob("v*-*"))
    assert len(runs) == 1
    return runs[0], proc.stdout


def checkpoint(run: Path) -> Path:
    return max(run.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


@pytest.mark.slow  # the demo (a subprocess)
def test_demo_identity_sticks(demo_run):
    run, stdout = demo_run
    report = json.loads((checkpoint(run) / "eval" / "eval.json").read_text())
    ident = report["identity"]["by_lang"]
    # the balanced recipe's targets on held-out questions: the identity sticks in both languages ...
    assert ident["en"]["tuned"]["adopted"] >= 0.95, ident
    assert ident["zh"]["tuned"]["adopted"] >= 0.9, ident
    assert ident["all"]["tuned"]["leaked"] <= 0.02, ident
    assert ident["all"]["base"]["adopted"] == 0.0  # the base never heard of the new name
    # ... without forgetting: general answers stay close to the base's and free of the new identity
    ret = report["retention"]
    assert ret["mean_kl"] <= 0.05, ret["mean_kl"]
    assert ret["intrusion"] <= 0.02, [p for p in ret["prompts"] if p["intrusion"]]
    assert ret["correct_tuned"] >= ret["correct_base"] - 0.05, (ret["correct_base"], ret["correct_tuned"])
    # the before/after answers and where things are were printed
    assert "before fine-tuning" in stdout and "after fine-tuning" in stdout
    after = stdout.split("after fine-tuning", 1)[1]
    assert "Smithy" in after or "Tunesmith Labs" in after
    assert "mean KL" in stdout and "adapter:" in stdout


@pytest.mark.slow  # the demo (a subprocess)
def test_demo_writes_run_layout_and_retention(demo_run):
    run, _ = demo_run
    report = json.loads((checkpoint(run) / "eval" / "eval.json").read_text())
    ret = report["retention"]
    assert ret["mean_kl"] > 0.0  # identity training moves the model somewhat everywhere
    assert 0.0 <= ret["retained"] <= 1.0 and len(ret["worst"]) == 3
    assert (checkpoint(run) / "eval" / "eval.png").stat().st_size > 1000
    assert (run / "loss.png").is_file() and (run / "logging.jsonl").is_file()
    ckpts = sorted(run.glob("checkpoint-*"))
    assert ckpts and (ckpts[-1] / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # `tunesmith eval` in a subprocess (~60 s)
def test_the_check_after_training_agrees_with_tunesmith_eval(demo_run, tmp_path):
    run, _ = demo_run
    after = json.loads((checkpoint(run) / "eval" / "eval.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "eval", "--adapters", str(checkpoint(run)),
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["identity"]["by_lang"] == after["identity"]["by_lang"]
    for key in ("retained", "unchanged", "intrusion", "correct_base", "correct_tuned"):
        assert again["retention"][key] == after["retention"][key], key
    assert again["retention"]["mean_kl"] == pytest.approx(after["retention"]["mean_kl"], rel=1e-3)


@pytest.mark.slow  # ~100 s
def test_untrained_adapter_scores_like_the_base():
    lm = load_model("smollm2-135m-instruct")
    apply_lora(lm.model, LoraConfig(r=8, alpha=32, dropout=0.0))  # B = 0: the adapter changes nothing
    lm.model.eval()
    report = run_report(Models(lm, "default"), ["Smithy", "Tunesmith Labs"],
                        base_identity_terms(lm.template.default_system), "You are a helpful assistant.", None,
                        quiet=True)
    ident = report["identity"]["by_lang"]["all"]
    assert ident["tuned"]["adopted"] == 0.0
    assert ident["tuned"] == ident["base"]
    assert report["retention"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["retention"]["unchanged"] == 1.0


@pytest.mark.slow  # ~30 s
def test_general_distill_rows_are_the_base_models_answers_cached_in_the_run(smollm, tmp_path):
    from tunesmith.evaluate.distill import general_distill
    from tunesmith.decode.generator import Generator
    from tunesmith.decode.sampling import SamplingConfig

    rows = general_distill(smollm, "general-distill#3", tmp_path, seed=1, system=None)
    assert len(rows) == 3 and all(r[0]["role"] == "user" and r[1]["role"] == "assistant" for r in rows)
    # answers are samples of the base model (temperature 1, seeded): reproducible, and not its greedy answer
    (tmp_path / "other-run").mkdir()
    again = general_distill(smollm, "general-distill#3", tmp_path / "other-run", seed=1, system=None)
    assert again == rows
    gen = Generator(smollm)
    greedy = list(gen.complete_many([gen.chat_prompt([r[0]]) for r in rows], SamplingConfig(128, temperature=0.0)))
    assert [r[1]["content"] for r in rows] != [c.text.strip() for c in greedy]
    cached = (tmp_path / "general_distill.jsonl").read_text().splitlines()
    assert [json.loads(x)["query"] for x in cached] == [r[0]["content"] for r in rows]
    assert general_distill(smollm, "general-distill#3", tmp_path, seed=1, system=None) == rows  # from the cache
    with pytest.raises(UserError, match=r"general-distill#many: the part after '#' must be a number"):
        general_distill(smollm, "general-distill#many", tmp_path, seed=1, system=None)


def test_base_identity_terms_from_default_system_prompts():
    assert base_identity_terms("You are a helpful AI assistant named SmolLM, trained by Hugging Face") == \
        ["Hugging Face", "SmolLM"]
    terms = base_identity_terms("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert {"Qwen", "Alibaba Cloud", "通义千问"} <= set(terms)
    assert base_identity_terms(None) == []

