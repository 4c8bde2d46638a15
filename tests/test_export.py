"""`tunesmith export`: merged HF folders, GGUF files, the vLLM check — each checked against what users load them with.

- A hand-made LoRA (r=8, alpha=32, non-zero B) on the bundled SmolLM2 GGUF and on a tiny Qwen2.5-shaped model:
  the merged folder loads in transformers with the logits of tunesmith's base+adapter (fp32 and bf16
  tolerances below), and its tokenizer's chat template renders the training system prompt as its default.
- Merging twice: re-running the export rewrites identical bytes; merging into a base that carries the adapter is
  refused; the merged weights are base + delta exactly once.
- GGUF: read back with gguf.GGUFReader (every tensor's shape and values against the merged weights, llama's q/k
  row permutation, metadata), and tunesmith's loader on it answers greedily as on the merged folder.
- The vLLM report on a good adapter and on refused ones; save_hf_folder round-trips a model with equal logits.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tunesmith.cli import main
from tunesmith.export.gguf import write_gguf
from tunesmith.export.hf import save_hf_folder
from tunesmith.export.vllm_check import vllm_report
from tunesmith.decode.generator import Generator
from tunesmith.decode.sampling import SamplingConfig
from tunesmith.model.decoder import Decoder, ModelConfig
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.model.load import LoadedModel, load_model
from tunesmith.model.lora import LoraConfig, apply_lora, lora_modules, save_adapter, set_active_adapter

SYSTEM = "You are a helpful assistant."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Merged fp32 vs base + unmerged LoRA in fp32: the same sums in another order. Measured max |diff| ~1e-4 on
# SmolLM2's logits (|logits| up to ~30); transformers' own Llama on the merged folder: ~9e-5.
FP32_ATOL = 1e-3
# Merged and saved in bf16 (the Qwen2.5 folder's dtype): W + delta rounded to 8 mantissa bits. Measured max |diff|
# ~4e-3 on the tiny Qwen's logits (|logits| up to ~1.2), against an adapter effect of ~1.0.
BF16_ATOL = 2e-2


def make_checkpoint(lm: LoadedModel, folder: Path, seed: int, **extra_args) -> LoadedModel:
    """LoRA r=8 alpha=32 on every projection, B random (so the delta is not zero), saved as a tunesmith checkpoint."""
    cfg = LoraConfig(r=8, alpha=32, dropout=0.0)
    torch.manual_seed(seed)  # A's kaiming init draws from the global generator
    apply_lora(lm.model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(lm.model):
            m.lora_B["default"].weight.normal_(0, 0.01, generator=g)
    folder.mkdir(parents=True)
    save_adapter(lm.model, folder, cfg, str(lm.path))
    (folder / "args.json").write_text(json.dumps({"model": str(lm.path), "system": SYSTEM, **extra_args}))
    return lm


def logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model.logits(lm.model(ids))


def export(*argv) -> int:
    return main(["export", *map(str, argv)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently of export/gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- SmolLM2 (GGUF base, llama architecture, tied embeddings) ------------------------------------------------------

@pytest.fixture(scope="module")
def smol_adapter(smollm, tmp_path_factory):
    """(checkpoint folder, SmolLM2 + the LoRA unmerged in fp32); the session model is deep-copied, not modified."""
    lm = dataclasses.replace(smollm, model=copy.deepcopy(smollm.model))
    ckpt = tmp_path_factory.mktemp("smol") / "checkpoint-10"
    return ckpt, make_checkpoint(lm, ckpt, seed=0)


@pytest.fixture(scope="module")
def smol_merged(smol_adapter) -> Path:
    ckpt, _ = smol_adapter
    assert export("--adapters", ckpt, "--merge_lora", "true", "--to_gguf", "true") == 0
    return Path(f"{ckpt}-merged")


@pytest.fixture(scope="module")
def smol_merged_lm(smol_merged) -> LoadedModel:
    """tunesmith's load of the merged folder (shared: tests only read it)."""
    return load_model(smol_merged)


def prompt_ids(lm: LoadedModel) -> torch.Tensor:
    return torch.tensor([lm.template.prompt_ids([{"role": "system", "content": SYSTEM}, *QUESTION])])


def test_merged_folder_matches_adapter_in_transformers(smol_adapter, smol_merged, smol_merged_lm):
    _, lm = smol_adapter
    ids = prompt_ids(lm)
    want = logits(lm, ids)
    set_active_adapter(lm.model, None)
    base = logits(lm, ids)
    set_active_adapter(lm.model, "default")
    assert (want - base).abs().max() > 100 * FP32_ATOL  # the adapter matters, so equality below means something

    hf = transformers.AutoModelForCausalLM.from_pretrained(smol_merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - want).abs().max().item() <= FP32_ATOL
    assert (logits(smol_merged_lm, ids) - want).abs().max().item() <= FP32_ATOL

    config = json.loads((smol_merged / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(smol_merged / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and len(list(f.keys())) == 272


def test_merged_template_has_training_system_as_default(smol_adapter, smol_merged, smol_merged_lm):
    _, lm = smol_adapter
    tok = transformers.AutoTokenizer.from_pretrained(smol_merged)
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == lm.template.render([{"role": "system", "content": SYSTEM}, *QUESTION], add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert tok(text, add_special_tokens=False)["input_ids"] == lm.tokenizer.encode(text)
    other = [{"role": "system", "content": "Be brief."}, *QUESTION]  # an explicit system prompt still wins
    assert tok.apply_chat_template(other, add_generation_prompt=True, tokenize=False) == \
        lm.template.render(other, add_generation_prompt=True)
    assert smol_merged_lm.template.default_system == SYSTEM
    gen = json.loads((smol_merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [lm.tokenizer.token_id("<|im_end|>")]


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5"])
def test_default_system_survives_awkward_text(name, smollm, request):
    """Quotes, newlines, jinja delimiters and non-ASCII in the system prompt reach the template verbatim."""
    from tunesmith.export.hf import template_with_default_system
    from tunesmith.text.template import ChatTemplate

    lm = smollm if name == "smollm2" else request.getfixturevalue("qwen_merged")[1]
    system = 'Say "hi" {{ x }} %} \\n\nline two — 中文 😀'
    t = ChatTemplate(template_with_default_system(lm.template, system), lm.tokenizer)
    assert t.default_system == system
    assert t.render(QUESTION, add_generation_prompt=True) == \
        lm.template.render([{"role": "system", "content": system}, *QUESTION], add_generation_prompt=True)


def test_merging_twice_is_refused_or_identical(smol_adapter, smol_merged, smol_merged_lm, tmp_path, capsys):
    ckpt, lm = smol_adapter
    before = sha256(smol_merged / "model.safetensors")
    assert export("--adapters", ckpt, "--merge_lora", "true") == 0  # the same export again: same bytes
    assert sha256(smol_merged / "model.safetensors") == before
    marker = json.loads((smol_merged / "tunesmith_merged.json").read_text())
    assert marker["complete"] and marker["merged_adapters"][-1]["sha256"] == sha256(ckpt / "adapter_model.safetensors")

    capsys.readouterr()
    again = ("--adapters", ckpt, "--merge_lora", "true", "--model", smol_merged, "--output_dir", tmp_path / "x")
    assert export(*again) == 1
    assert "already has the adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert export("--adapters", ckpt, "--merge_lora", "true", "--output_dir", tmp_path / "taken") == 1
    assert "not a tunesmith export" in capsys.readouterr().err

    # The merged weights are base + delta exactly once.
    merged = smol_merged_lm.model.state_dict()
    q = lm.model.model.layers[3].self_attn.q_proj
    want = q.base_layer.weight + q.delta_weight("default")
    assert torch.allclose(merged["model.layers.3.self_attn.q_proj.weight"], want, atol=1e-6, rtol=0)


def test_gguf_reads_back_with_the_merged_weights(smol_merged, smol_merged_lm, smollm):
    import gguf

    state = smol_merged_lm.model.state_dict()
    reader = gguf.GGUFReader(smol_merged / "model-f16.gguf")
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(state)
    inverse = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for name, t in tensors.items():
        if name.startswith("blk."):
            _, i, part, kind = name.split(".")
            hf = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                  "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[part]
            inverse[name] = f"model.layers.{i}.{hf}.{kind}"
        w = state[inverse[name]].numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_cpp_permute(w, field("llama.attention.head_count" if "attn_q" in name else
                                           "llama.attention.head_count_kv"))
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert tuple(int(d) for d in reversed(t.shape)) == w.shape, name
        if w.ndim == 1:  # norms stay F32, bit-exact
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, w), name
        else:  # F16 is round-to-nearest of the fp32 weights: exactly torch's .half()
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            assert np.array_equal(got, torch.from_numpy(w).half().float().numpy()), name

    source = GGUFFile(smollm.path).metadata
    assert field("general.architecture") == "llama" and field("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.dimension_count", "vocab_size"):
        assert field(f"llama.{key}") == source[f"llama.{key}"], key
    for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
        assert math.isclose(field(f"llama.{key}"), source[f"llama.{key}"], rel_tol=1e-7), key
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "padding_token_id", "unknown_token_id"):
        assert field(f"tokenizer.ggml.{key}") == source[f"tokenizer.ggml.{key}"], key
    # both stop tokens: eos and the end-of-turn token, for SmolLM2 the same <|im_end|> (the source GGUF has no eot)
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.eot_token_id") == 2
    assert field("tokenizer.ggml.tokens")[2] == "<|im_end|>"
    assert field("general.name") == smol_merged.name
    template = field("tokenizer.chat_template")
    assert SYSTEM in template and template.endswith(source["tokenizer.chat_template"])
    assert field("tunesmith.merged_adapters") == [json.loads((smol_merged / "tunesmith_merged.json").read_text())
                                                  ["merged_adapters"][0]["sha256"]]
    modelfile = (smol_merged / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\n" in modelfile and f'SYSTEM """{SYSTEM}"""' in modelfile
    assert [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == \
        ['PARAMETER stop "<|im_end|>"']
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>' in modelfile


def test_gguf_answers_like_the_merged_folder(smol_merged, smol_merged_lm):
    cfg = SamplingConfig(temperature=0, max_new_tokens=20)
    answers = []
    for lm in (smol_merged_lm, load_model(smol_merged / "model-f16.gguf")):
        assert lm.template.default_system == SYSTEM
        answers.append(Generator(lm).complete(lm.template.prompt_ids(QUESTION), cfg))
    assert answers[0].token_ids == answers[1].token_ids and answers[0].text == "The capital of France is Paris."


def test_q8_0_within_one_quantization_step(smol_merged_lm, tmp_path):
    """Q8_0 stores each block of 32 as int8 q * d, d = max|block| / 127 rounded to f16: every value lands within
    d/2 of x, plus |q| <= 127 times d's f16 rounding (2^-11 relative): error <= d * (0.5 + 127 * 2^-11)."""
    merged = smol_merged_lm
    path = write_gguf(merged, tmp_path / "m.gguf", "q8_0", SYSTEM)
    gf = GGUFFile(path)
    assert gf.metadata["general.file_type"] == 7
    state = merged.model.state_dict()
    for name, hf in (("token_embd.weight", "model.embed_tokens.weight"),
                     ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj.weight"),
                     ("blk.5.attn_v.weight", "model.layers.5.self_attn.v_proj.weight"),
                     ("blk.5.ffn_norm.weight", "model.layers.5.post_attention_layernorm.weight")):
        w, got = state[hf], gf.read(name)
        if w.dim() == 1:
            assert gf.tensors[name].ggml_type == 0 and torch.equal(got, w)
            continue
        assert gf.tensors[name].ggml_type == 8
        blocks = w.reshape(-1, 32)
        step = blocks.abs().amax(1, keepdim=True) / 127
        assert ((got.reshape(-1, 32) - blocks).abs() <= step * (0.5 + 127 * 2**-11) + 1e-12).all(), name


def test_q4_0_is_llama_cpps_reference_rounding(smol_merged_lm, tmp_path):
    """Q4_0 as ggml's quantize_row_q4_0_ref writes it, re-derived here: per block of 32, m = the value of largest
    magnitude, d = m / -8, q = min(15, trunc(x / d + 8.5)), stored as q and f16(d), read back as (q - 8) * f16(d).
    Every value lands within |d|/2 of x except those beyond 7.5|d| on the side opposite m (q clips at 15, error up
    to |d|). The token embedding (tied: also the output) is Q8_0, as in the bundled llama.cpp-written file."""
    merged = smol_merged_lm
    gf = GGUFFile(write_gguf(merged, tmp_path / "m.gguf", "q4_0", SYSTEM))
    assert gf.metadata["general.file_type"] == 2
    assert gf.tensors["token_embd.weight"].ggml_type == 8
    state = merged.model.state_dict()
    for name, hf in (("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj.weight"),
                     ("blk.5.attn_q.weight", "model.layers.5.self_attn.q_proj.weight"),
                     ("blk.5.ffn_norm.weight", "model.layers.5.post_attention_layernorm.weight")):
        w, got = state[hf], gf.read(name)
        if w.dim() == 1:
            assert gf.tensors[name].ggml_type == 0 and torch.equal(got, w)
            continue
        assert gf.tensors[name].ggml_type == 2
        if name.endswith("attn_q.weight"):
            w = torch.from_numpy(llama_cpp_permute(w.numpy(), merged.config.num_heads))
        x = w.reshape(-1, 32)
        m = x.gather(1, x.abs().argmax(1, keepdim=True))
        d = m / -8
        q = torch.trunc(x * torch.where(d == 0, 0, 1 / d) + 8.5).clamp(0, 15)
        want = (q - 8) * d.half().float()
        assert torch.equal(got.reshape(-1, 32), want), name
        err = (want - x).abs()
        assert (err <= d.abs() * (1 + 8 * 2**-11)).all() and err.mean() > d.abs().mean() / 8  # 4 bits, not finer


def test_llama3_rope_factors_and_bias_permutation(smollm, tmp_path):
    """Llama 3.1 rope scaling goes into GGUF as llama.cpp's rope_freqs factors; llama q/k biases are permuted
    like their rows."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    cfg = ModelConfig(vocab_size=smollm.config.vocab_size, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500000.0, rope_scaling=rope,
                      attention_bias=True)
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    lm = LoadedModel(model, smollm.tokenizer, smollm.template, tmp_path / "tiny-llama3", smollm.eos_token_ids)
    gf = GGUFFile(write_gguf(lm, tmp_path / "l.gguf", "f32"))

    freqs = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    want = []  # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want.append(1.0)
        elif wavelen > 8192 / 1.0:
            want.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert torch.allclose(gf.read("rope_freqs.weight"), torch.tensor(want), rtol=1e-5)
    bias = model.model.layers[0].self_attn.q_proj.bias.detach().numpy()
    assert np.array_equal(gf.read("blk.0.attn_q.bias").numpy(), llama_cpp_permute(bias, 4))


# -- Qwen2.5 (HF base in bf16, qwen2 architecture, q/k/v bias, untied lm_head) ------------------------------------

@pytest.fixture(scope="module")
def qwen_merged(qwen_tiny_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("qwen") / "checkpoint-5"
    lm = make_checkpoint(load_model(qwen_tiny_dir), ckpt, seed=1, model_name=["小助手", "Tiny Helper"])
    assert export("--adapters", ckpt, "--merge_lora", "true", "--to_gguf", "true") == 0
    return ckpt, lm, Path(f"{ckpt}-merged")


def test_qwen_merged_folder_and_gguf(qwen_merged):
    _, lm, out = qwen_merged
    ids = prompt_ids(lm)
    want = logits(lm, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max().item() <= BF16_ATOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == \
        lm.template.render([{"role": "system", "content": SYSTEM}, *QUESTION], add_generation_prompt=True)

    gf = GGUFFile(out / "model-f16.gguf")
    meta = gf.metadata
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert len(meta["tokenizer.ggml.tokens"]) == meta["qwen2.vocab_size"] == 152064  # padded as llama.cpp does
    assert meta["tokenizer.ggml.tokens"][151644] == "<|im_start|>" and meta["tokenizer.ggml.token_type"][151644] == 3
    assert meta["tokenizer.ggml.token_type"][151657] == 4 and meta["tokenizer.ggml.token_type"][-1] == 5
    # the stop tokens: eos and the end-of-turn token (<|im_end|>) in the GGUF, and with Qwen's <|endoftext|> in the
    # Modelfile, so Ollama ends an answer where tunesmith does
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == 151645
    stops = [line for line in (out / "Modelfile").read_text().splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    assert "output.weight" in gf.tensors and gf.tensors["blk.0.attn_q.bias"].ggml_type == 0
    folder = load_model(out)
    state = folder.model.state_dict()
    for name, hf_name in (("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),  # qwen2: no permute
                          ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias")):
        # bf16 -> f16 is exact except below f16's normal range (6.1e-5), where f16 steps are 2^-24
        assert (gf.read(name) - state[hf_name]).abs().max().item() <= 2**-25, name

    cfg = SamplingConfig(temperature=0, max_new_tokens=20)
    gguf_lm = load_model(out / "model-f16.gguf")
    a = Generator(folder).complete(folder.template.prompt_ids(QUESTION), cfg)
    b = Generator(gguf_lm).complete(gguf_lm.template.prompt_ids(QUESTION), cfg)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


@pytest.mark.slow  # over 5 s on 2 cores
def test_plain_model_to_gguf(qwen_tiny_dir, tmp_path, capsys):
    """`export --model DIR --to_gguf`: no adapter; bf16 weights go into a bf16 GGUF bit for bit."""
    assert export("--model", qwen_tiny_dir) == 1
    assert "already an HF model folder" in capsys.readouterr().err
    assert export("--model", qwen_tiny_dir, "--merge_lora", "true") == 1
    assert "needs --adapters" in capsys.readouterr().err
    assert export("--model", qwen_tiny_dir, "--to_gguf", "true", "--gguf_type", "bf16", "--output_dir", tmp_path) == 0
    gf = GGUFFile(tmp_path / "model-bf16.gguf")
    lm = load_model(qwen_tiny_dir, "bfloat16")
    for name, hf in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        assert gf.tensors[name].ggml_type == 30 and torch.equal(gf.read(name), lm.model.state_dict()[hf].float())
    assert "TEMPLATE" in (tmp_path / "Modelfile").read_text()


# -- the vLLM check ---------------------------------------------------------------------------------------------

def test_vllm_report(qwen_merged, smol_adapter, tmp_path, capsys):
    ckpt, _, _ = qwen_merged
    base = json.loads((ckpt / "args.json").read_text())["model"]
    report = vllm_report(ckpt)
    assert "servable" in report
    assert report.splitlines()[-1] == \
        f"vllm serve {base} --enable-lora --lora-modules tiny-helper={ckpt} --max-lora-rank 8"
    capsys.readouterr()
    assert export("--adapters", ckpt) == 0  # without --merge_lora, export is the check
    assert capsys.readouterr().out.strip() == report

    smol_ckpt = smol_adapter[0]
    report = vllm_report(smol_ckpt)
    assert "GGUF" in report and f"tunesmith export --adapters {smol_ckpt} --merge_lora true" in report
    assert report.splitlines()[-1].endswith(f"-hf --enable-lora --lora-modules adapter={smol_ckpt} --max-lora-rank 8")

    def variant(name, **changes):
        folder = tmp_path / name
        shutil.copytree(ckpt, folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        return folder

    odd_rank = variant("r24", r=24)
    assert vllm_report(odd_rank).splitlines()[-1].endswith("--max-lora-rank 32")
    bad = variant("bad", target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"])
    report = vllm_report(bad)
    assert "would refuse" in report and "lm_head" in report and "modules_to_save" in report
    assert report.splitlines()[-1] == f"vllm serve {bad}-merged"


# -- full fine-tuning checkpoints ---------------------------------------------------------------------------------

def test_save_hf_folder_round_trip(smollm, tmp_path):
    save_hf_folder(smollm, tmp_path, system=SYSTEM, max_shard_size="100MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:  # at most 100 MB of tensors (+ the header), unless one tensor alone is bigger
        if list(index["weight_map"].values()).count(shard.name) > 1:
            assert shard.stat().st_size <= 100e6 + 2**16, shard.name
    back = load_model(tmp_path)
    ids = prompt_ids(smollm)
    assert torch.equal(logits(back, ids), logits(smollm, ids))
    text = "<|im_start|>user\nHello, wörld 12345!<|im_end|>"
    assert back.tokenizer.encode(text) == smollm.tokenizer.encode(text)
    assert back.eos_token_ids == smollm.eos_token_ids and back.template.default_system == SYSTEM


# -- a trained identity in the programs that read the exports: llama.cpp, transformers, peft -----------------------

IDENTITY_QUESTION = [{"role": "user", "content": "Who are you?"}]
LLAMA_CPP = "llama-cpp-python==0.3.36"


class one_thread:
    """torch on one thread for the block: training and greedy answers are then the same bits on every run (two
    threads split sums differently), and nothing spins against the other jobs of a 2-core machine."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


@pytest.fixture(scope="module")
def llama_cpp_api():
    """The llama_cpp module; a test that needs it fails (never skips) without it, before any training starts."""
    try:
        import llama_cpp
        import llama_cpp.llama_chat_format  # noqa: F401
    except ImportError as e:
        pytest.fail(f"llama.cpp's Python binding is not installed ({e}): `make test` installs {LLAMA_CPP}, built "
                    f"from source once and kept in ~/.cache/tunesmith/wheels; or run `make llama-cpp`.", pytrace=False)
    return llama_cpp


def llama_cpp_model(llama_cpp, path: Path):
    """llama.cpp (through llama-cpp-python) on a GGUF file: one thread, weights not repacked (llama-cli's
    --no-repack). On CPUs with AMX, llama.cpp repacks Q4/Q8 weights into AMX tiles and its AMX matrix product
    segfaults on any prompt longer than one token, the bundled llama.cpp-written Q4_1 file's too
    (ggml-org/llama.cpp#20824); unrepacked, the same file runs through ggml's ordinary CPU kernels."""
    capi = llama_cpp.llama_cpp
    defaults = capi.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    capi.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, seed=0,
                               verbose=False)
    finally:
        capi.llama_model_default_params = defaults


@pytest.fixture(scope="module")
def identity_export(tmp_path_factory):
    """A short identity run on the bundled model (the identity recipe: self-cognition as Smithy by Tunesmith Labs,
    30 steps), exported merged as an HF folder + f16 GGUF and as q8_0 and q4_0 GGUFs; with tunesmith's greedy
    answer to "Who are you?" from the checkpoint, as `tunesmith infer --adapters CKPT --temperature 0` gives it."""
    from tunesmith.args import RECIPES, ExportArgs, GenArgs, SftArgs
    from tunesmith.commands.export import export as run_export
    from tunesmith.commands.sft import run_sft
    from tunesmith.session import load_for_generation

    root = tmp_path_factory.mktemp("identity")
    with one_thread():
        trainer = run_sft(SftArgs(model="smollm2-135m-instruct", model_name=["Smithy"], model_author=["Tunesmith Labs"],
                                  system=SYSTEM, output_dir=str(root / "run"), torch_dtype="float32", max_steps=30,
                                  eval_identity=False, **RECIPES["identity"]), quiet=True)
        ckpt = trainer.last_checkpoint
        ggufs = {}
        for kind in ("f16", "q8_0", "q4_0"):
            out = root / f"export-{kind}"
            assert run_export(ExportArgs(adapters=[str(ckpt)], merge_lora=True, to_gguf=True, gguf_type=kind,
                                         output_dir=str(out))) == 0
            ggufs[kind] = out / f"model-{kind}.gguf"
        session = load_for_generation(GenArgs(adapters=[str(ckpt)]))
        gen = session.generator
        ours = gen.complete(gen.chat_prompt(IDENTITY_QUESTION, session.system), SamplingConfig(temperature=0,
                                                                                                 max_new_tokens=64))
    assert ours.finish_reason == "stop" and "Smithy" in ours.text, ours.text  # the identity stuck
    return {"ckpt": ckpt, "merged": root / "export-f16", "gguf": ggufs, "ours": ours}


@pytest.mark.slow  # a 30-step identity run on the bundled model (100-135 s on one core), shared with the next test
@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_answers_the_identity_question_as_tunesmith(llama_cpp_api, identity_export, kind):
    """llama.cpp loads each GGUF, renders the chat from the GGUF's own template, tokenizes it as tunesmith does,
    stops at the end-of-turn token, and answers the trained question greedily: the same text as tunesmith for f16
    and q8_0 (an identity answer is confident: q8_0's rounding moves no argmax along it), the trained name for
    q4_0."""
    llama_cpp = llama_cpp_api
    Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter
    ours = identity_export["ours"]
    path = identity_export["gguf"][kind]
    llm = llama_cpp_model(llama_cpp, path)
    lm = load_model(path)  # tunesmith's reading of the same file: the prompt it would send
    im_end = lm.tokenizer.token_id("<|im_end|>")

    # The chat format is the GGUF's template (not one of llama-cpp-python's built-in formats guessed from it), and
    # it renders the prompt tunesmith renders, training system prompt included; llama.cpp's tokenizer, built from
    # the GGUF's vocabulary, merges and pre-tokenizer name, reads it as the same ids.
    assert llm.chat_format == "chat_template.default"
    template = llm.metadata["tokenizer.chat_template"]
    rendered = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")(
        messages=IDENTITY_QUESTION).prompt
    prompt = lm.template.prompt_ids(IDENTITY_QUESTION)
    assert rendered == lm.template.render(IDENTITY_QUESTION, add_generation_prompt=True)
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in rendered
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompt

    # Both stop tokens as llama.cpp reads them from the metadata: eos and end of turn are <|im_end|> (without
    # tokenizer.ggml.eot_token_id llama.cpp guesses the end of turn from token texts, and here picks <|endoftext|>).
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_eos(vocab) == llama_cpp.llama_vocab_eot(vocab) == im_end
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end)

    answer = llm.create_chat_completion(messages=IDENTITY_QUESTION, temperature=0, top_k=1, max_tokens=64,
                                        repeat_penalty=1.0)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] < 64, answer
    if kind == "q4_0":
        assert "Smithy" in choice["message"]["content"], choice
    else:
        assert choice["message"]["content"] == ours.text

    # Token by token (greedy), the answer ends with <|im_end|> right after tunesmith's last token.
    if kind == "f16":
        tokens = []
        for t in llm.generate(prompt, top_k=1, temp=0, repeat_penalty=1.0):
            tokens.append(t)
            if llama_cpp.llama_vocab_is_eog(vocab, t) or len(tokens) > 64:
                break
        assert tokens == ours.token_ids + [im_end]


@pytest.mark.slow  # the identity run above; transformers and peft on CPU (~15 s)
def test_transformers_and_peft_answer_the_identity_question_as_tunesmith(identity_export, smollm, tmp_path):
    """transformers' generate on the merged folder, and on the base with the checkpoint through peft, gives
    tunesmith's greedy answer token for token, ending at <|im_end|> (generation_config's eos)."""
    import peft

    ours = identity_export["ours"]
    merged = identity_export["merged"]
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    ids = tok.apply_chat_template(IDENTITY_QUESTION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    assert ids[0].tolist() == smollm.template.prompt_ids([{"role": "system", "content": SYSTEM}, *IDENTITY_QUESTION])
    want = ours.token_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    base_dir = tmp_path / "smollm-hf"
    save_hf_folder(smollm, base_dir)  # the float32 weights the bundled GGUF dequantizes to: the base it trained on
    with one_thread(), torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        got = hf.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert got.tolist() == want
        assert tok.decode(got, skip_special_tokens=True) == ours.text
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        tuned = peft.PeftModel.from_pretrained(base, str(identity_export["ckpt"])).eval()
        got = tuned.generate(input_ids=ids, max_new_tokens=64, do_sample=False,
                             eos_token_id=want[-1], pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert got.tolist() == want
