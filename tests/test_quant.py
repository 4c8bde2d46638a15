"""QLoRA bases (model/quant.py): the decoder layers' projections stored in bitsandbytes' 4-bit (NF4/FP4, double
quant) and 8-bit formats, LoRA trained above them.

- The stored format is bitsandbytes' own (quantize -> dequantize equals its functions bit for bit) and is what the
  plain-PyTorch reference below reads; the module's product is F.linear with that dequantized weight, gradients
  reach x and the LoRA above it, and no dequantized weight is kept for backward.
- Loading quantizes shard by shard (HF folders, sharded and not; the bundled GGUF), and a folder that
  transformers + bitsandbytes saved quantized loads as it is (same weights as quantizing the original here).
- A 4-bit LoRA run's loss falls; its adapter is a plain PEFT adapter that peft applies over transformers'
  own 4-bit model with our logits; infer/eval/deploy reload the base quantized from args.json; merging into a
  quantized base, full fine-tuning on one and export with --quant_bits are one sentence each; export merges
  into the unquantized base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitsandbytes.functional as BF
from tiny_models import make_tiny, random_ids
from tunesmith.errors import UserError
from tunesmith.model import load as load_mod
from tunesmith.model.load import load_model
from tunesmith.model.lora import ALL_LINEAR, LoRALinear, LoraConfig
from tunesmith.model.quant import (QuantConfig, QuantLinear, is_quantized, parameter_bytes, quant_modules,
                                   quantize_linears)
from tutorial_rows import TUTORIAL_ROWS

CASES_4BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def reference_dequantize(q: QuantLinear) -> torch.Tensor:
    """bitsandbytes' layouts written out in plain PyTorch, float32 (out, in).
    4-bit: two codes a byte (high nibble first), each code -> value through the 16-entry quant_map, times the
    absmax of its block of 64 weights; double quant: each absmax is itself an 8-bit code through
    nested_quant_map, times the nested absmax of its block of 256, plus the offset.
    8-bit: int8 row times its absmax (SCB) / 127."""
    if q.bits == 8:
        return q.weight.float() * (q.SCB.float()[:, None] / 127)
    n = q.out_features * q.in_features
    packed = q.weight.view(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], -1).view(-1)[:n].long()
    absmax = q.absmax
    if hasattr(q, "nested_absmax"):
        nested = q.nested_absmax.repeat_interleave(256)[: absmax.numel()]
        absmax = q.nested_quant_map[absmax.long()] * nested + q.nested_offset
    return (q.quant_map[codes].view(-1, 64) * absmax.float()[:, None]).view(q.out_features, q.in_features)


def linear(bias=True, seed=0, out=256, inp=192) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out, 1) * 4)  # rows of different scales
    return lin


# ---- the format and the product -------------------------------------------------------------------------------

@pytest.mark.parametrize("quant_type, double", CASES_4BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_round_trip_is_bitsandbytes_own(quant_type, double, dtype):
    lin = linear().to(dtype)
    q = QuantLinear.from_linear(lin, QuantConfig(4, quant_type, double))
    data, state = BF.quantize_4bit(lin.weight.data, blocksize=64, compress_statistics=double, quant_type=quant_type)
    theirs = BF.dequantize_4bit(data, state)
    assert torch.equal(q.weight.data, data) and q.weight.dtype == torch.uint8 and not q.weight.requires_grad
    assert q.dequantized(dtype).dtype == dtype and torch.equal(q.dequantized(dtype), theirs)
    torch.testing.assert_close(reference_dequantize(q).to(dtype), theirs, rtol=0, atol=0)
    assert hasattr(q, "nested_absmax") == double and q.absmax.dtype == (torch.uint8 if double else torch.float32)
    # quantization error: NF4 ~ 1/16 of a block's absmax at most
    assert (theirs.float() - lin.weight.float()).abs().max() < 0.2 * lin.weight.abs().max()


def test_8bit_round_trip_is_bitsandbytes_own():
    lin = linear()
    q = QuantLinear.from_linear(lin, QuantConfig(8))
    cb, scb, _ = BF.int8_vectorwise_quant(lin.weight.data.half())
    assert torch.equal(q.weight.data, cb) and q.weight.dtype == torch.int8 and torch.equal(q.SCB, scb)
    assert torch.equal(q.dequantized(torch.float32), BF.int8_vectorwise_dequant(cb, scb))
    torch.testing.assert_close(reference_dequantize(q), q.dequantized(torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits, quant_type, double", [(4, "nf4", True), (4, "fp4", False), (8, "int8", False)])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_product_is_f_linear_with_the_dequantized_weight_and_grads_reach_x(bits, quant_type, double, compute):
    lin = linear()
    q = QuantLinear.from_linear(lin, QuantConfig(bits, quant_type, double, compute))
    x = torch.randn(2, 5, 192, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    # the plain PyTorch reference: dequantize, then F.linear (in the compute dtype, back to x's)
    x_ref = x.detach().clone().requires_grad_()
    w = reference_dequantize(q)
    ref = F.linear(x_ref.to(compute), w.to(compute), lin.bias.detach().to(compute)).to(x.dtype)
    assert y.dtype == x.dtype
    if compute == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(y, F.linear(x.to(compute), q.dequantized(), q.bias.to(compute)).to(x.dtype),
                               rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    tol = 1e-5 if compute == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    assert q.weight.grad is None and q.bias.grad is None
    # backward rebuilt the weight: nothing of (out x in) floats was kept between forward and backward
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 256 * 192]


def test_lora_trains_above_a_quantized_linear():
    q = QuantLinear.from_linear(linear(), QuantConfig(4))
    m = LoRALinear(q)
    m.add_adapter("default", LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        m.lora_B["default"].weight.normal_()
    x = torch.randn(3, 192)
    y = m(x)
    torch.testing.assert_close(y, q(x) + m.lora_B["default"](m.lora_A["default"](x)) * 2.0)
    y.square().sum().backward()
    assert m.lora_A["default"].weight.grad.abs().sum() > 0 and m.lora_B["default"].weight.grad.abs().sum() > 0
    assert m.weight.device == torch.device("cpu") and (m.base_layer.in_features, m.base_layer.out_features) == (192, 256)


# ---- loading --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_4bit():
    return load_model("smollm2-135m-instruct", quant=QuantConfig(4))


def test_gguf_loads_quantized_layer_linears_only_in_under_40_percent_of_the_bytes(smollm, smollm_4bit):
    model, cfg = smollm_4bit.model, smollm_4bit.config
    names = [n for n, _ in quant_modules(model)]
    assert len(names) == 7 * cfg.num_layers and {n.rsplit(".", 1)[1] for n in names} == set(ALL_LINEAR)
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    ratio = parameter_bytes(model) / parameter_bytes(smollm.model)
    assert ratio < 0.40, ratio
    # the GGUF weights, dequantized to float32 as the plain load has them, then quantized: bitsandbytes' own
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        w = smollm.model.get_submodule(name).weight.data
        data, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(model.get_submodule(name).dequantized(torch.float32), BF.dequantize_4bit(data, state))


def test_generation_over_a_quantized_base_skips_fusing_and_equals_the_plain_forward(smollm_4bit):
    from tunesmith.decode.generator import Generator
    from tunesmith.decode.sampling import SamplingConfig
    from tunesmith.model.decoder import SharedInput

    gen = Generator(smollm_4bit)
    ids = gen.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    got = gen.complete(ids, SamplingConfig(max_new_tokens=8, temperature=0.0)).token_ids
    assert all(type(layer.self_attn.inputs) is SharedInput and type(layer.mlp.inputs) is SharedInput
               for layer in smollm_4bit.model.model.layers)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(len(got)):
            seq.append(int(smollm_4bit.model.logits(smollm_4bit.model(torch.tensor([seq]))[:, -1]).argmax()))
    assert seq[len(ids):] == got


def test_hf_folder_quantizes_shard_by_shard(tmp_path, monkeypatch):
    _, folders = make_tiny("qwen2", tmp_path)
    plain = load_model(folders["unsharded"])
    quantize_linears(plain.model, QuantConfig(4))
    calls = []
    read = load_mod.read_safetensors
    monkeypatch.setattr(load_mod, "read_safetensors", lambda files, *a, **k: calls.append(list(files)) or read(files, *a, **k))
    sharded = load_model(folders["sharded"], quant=QuantConfig(4))
    shards = sorted(folders["sharded"].glob("*.safetensors"))
    assert sorted(f for c in calls for f in c) == shards and all(len(c) == 1 for c in calls)  # one shard a read
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(sharded.model.logits(sharded.model(ids)), plain.model.logits(plain.model(ids)),
                                   rtol=0, atol=0)
    assert sharded.model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases kept


def _hf_quantized_folder(src: Path, out: Path, bits: int) -> Path:
    """src saved again by transformers + bitsandbytes, quantized as ms-swift / the *-bnb-4bit uploads are."""
    import transformers

    cfg = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32) if bits == 4 else
           transformers.BitsAndBytesConfig(load_in_8bit=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, quantization_config=cfg,
                                                           device_map="cpu")
    hf.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_folder_saved_quantized_by_transformers_loads_as_it_is(qwen_tiny_dir, tmp_path, bits):
    saved = _hf_quantized_folder(qwen_tiny_dir, tmp_path / f"bnb-{bits}bit", bits)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    theirs = load_model(saved, "float32")
    mine = load_model(qwen_tiny_dir, "float32", quant=QuantConfig(bits))
    assert len(quant_modules(theirs.model)) == 7 * theirs.config.num_layers
    for (n, a), (_, b) in zip(quant_modules(theirs.model), quant_modules(mine.model)):
        assert torch.equal(a.dequantized(), b.dequantized()), n  # the same bitsandbytes quantization of one weight
    ids = torch.tensor([mine.template.prompt_ids([{"role": "user", "content": "Hello there"}])])
    with torch.no_grad():
        torch.testing.assert_close(theirs.model.logits(theirs.model(ids)), mine.model.logits(mine.model(ids)),
                                   rtol=0, atol=0)
    with pytest.raises(UserError, match=f"already quantized to {bits} bits by bitsandbytes; drop --quant_bits"):
        load_model(saved, "float32", quant=QuantConfig(12 - bits))


# ---- training, generation, export -----------------------------------------------------------------------------

def _rows(n):
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"I am Quill, answer {i}."}]} for i in range(n)]


def _train(model, rows, out: Path, steps: int, lr: float, **kw):
    from tunesmith.args import SftArgs
    from tunesmith.commands.sft import run_sft

    data = out / "data.json"
    out.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(rows, ensure_ascii=False))
    args = SftArgs(model=str(model), dataset=[str(data)], output_dir=str(out / "output"), max_steps=steps,
                   learning_rate=lr, per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
                   save_steps=steps, logging_steps=1, lora_dropout=0.0, torch_dtype="float32", **kw)
    return run_sft(args, quiet=True)


def _peft_4bit_logits(folder: Path, ckpt: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, base + adapter) logits of transformers' own 4-bit model (nf4, double quant, float32 compute) with peft,
    both float32 throughout."""
    import peft
    import transformers

    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, quantization_config=cfg,
                                                           device_map="cpu").eval()
    for m in hf.modules():  # bnb's CPU inference kernel for AVX512-BF16 machines computes in bfloat16 (3e-3 off
        if hasattr(m, "support_avx512bf16_for_cpu"):  # here); its float32 path dequantizes and runs F.linear
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        base = hf(input_ids=ids).logits
        return base, peft.PeftModel.from_pretrained(hf, str(ckpt)).eval()(input_ids=ids).logits


def test_4bit_lora_on_the_tiny_qwen_is_a_peft_adapter_over_transformers_4bit(qwen_tiny_dir, tmp_path):
    from tunesmith.args import GenArgs
    from tunesmith.session import load_for_generation

    trainer = _train(qwen_tiny_dir, _rows(4), tmp_path, steps=3, lr=1e-2, quant_bits=4)
    assert trainer.losses[-1] < trainer.losses[0]
    ckpt = trainer.last_checkpoint
    recorded = json.loads((ckpt / "args.json").read_text())
    assert (recorded["quant_method"], recorded["quant_bits"], recorded["bnb_4bit_quant_type"],
            recorded["bnb_4bit_use_double_quant"]) == ("bnb", 4, "nf4", True)
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and "quantization_config" not in adapter

    session = load_for_generation(GenArgs(adapters=[str(ckpt)], torch_dtype="float32"))
    assert is_quantized(session.lm.model)  # args.json's flags: the base it trained on
    ids = torch.tensor([session.lm.template.prompt_ids([{"role": "user", "content": "Question 1?"}])])
    hf_base, hf_tuned = _peft_4bit_logits(qwen_tiny_dir, ckpt, ids)
    with torch.no_grad():
        ours = session.lm.model.logits(session.lm.model(ids))
    # transformers quantizes the same float32 weights with the same bitsandbytes calls: float32 logits agree to 1e-4
    torch.testing.assert_close(ours, hf_tuned, rtol=1e-4, atol=1e-4)
    assert (hf_tuned - hf_base).abs().max() > 1e-2

    plain = load_for_generation(GenArgs(adapters=[str(ckpt)], torch_dtype="float32", quant_method="none"))
    assert not is_quantized(plain.lm.model)


@pytest.mark.slow  # ~40 s on 2 CPU cores: the bundled 135M model, 4 steps over a 4-bit base, an fp32 HF export
def test_4bit_lora_on_the_bundled_model_learns_and_loads_in_peft_and_exports_merged(smollm, tmp_path, monkeypatch):
    from tunesmith.args import ExportArgs, GenArgs
    from tunesmith.commands import export as export_cmd
    from tunesmith.export.hf import save_hf_folder
    from tunesmith.model.lora import lora_modules
    from tunesmith.session import load_for_generation

    trainer = _train("smollm2-135m-instruct", TUTORIAL_ROWS, tmp_path, steps=4, lr=2e-3, quant_bits=4)
    losses = trainer.losses
    assert losses[-1] < 0.5 * losses[0], losses  # measured 3.64 -> 0.99
    ckpt = trainer.last_checkpoint

    session = load_for_generation(GenArgs(adapters=[str(ckpt)]))
    assert len(quant_modules(session.lm.model)) == 7 * session.lm.config.num_layers
    hf_dir = tmp_path / "smollm-hf"
    save_hf_folder(smollm, hf_dir)  # the float32 weights the GGUF dequantizes to: what both sides quantize
    ids = torch.tensor([session.lm.template.prompt_ids([{"role": "user", "content": "你是谁？"}])])
    _, hf_tuned = _peft_4bit_logits(hf_dir, ckpt, ids)
    with torch.no_grad():
        ours = session.lm.model.logits(session.lm.model(ids))
    torch.testing.assert_close(ours, hf_tuned, rtol=1e-4, atol=1e-4)

    # export merges into the unquantized (float32) base
    seen = {}
    monkeypatch.setattr(export_cmd, "write_export", lambda lm, *a, **k: seen.setdefault("lm", lm))
    assert export_cmd.export(ExportArgs(adapters=[str(ckpt)], merge_lora=True, output_dir=str(tmp_path / "m"))) == 0
    merged = seen["lm"].model
    assert not is_quantized(merged) and not lora_modules(merged)
    unmerged = load_for_generation(GenArgs(adapters=[str(ckpt)], quant_method="none")).lm.model
    with torch.no_grad():
        torch.testing.assert_close(merged.logits(merged(ids)), unmerged.logits(unmerged(ids)), rtol=1e-4, atol=1e-4)


# ---- refusals -------------------------------------------------------------------------------------------------

def _fake_4bit_checkpoint(root: Path) -> Path:
    ckpt = root / "v0-run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "args.json").write_text(json.dumps({"model": "smollm2-135m-instruct", "quant_method": "bnb",
                                                "quant_bits": 4, "bnb_4bit_quant_type": "nf4"}))
    return ckpt


MERGE = ("--merge_lora true cannot merge into a base quantized to 4 bits; merge into the full-precision base with "
         "`tunesmith export --adapters CKPT --merge_lora true`, or load the base unquantized with --quant_method none.")


@pytest.mark.parametrize("argv, sentence", [
    ("sft --quant_method bnb", "--quant_method bnb needs --quant_bits 4 or 8."),
    ("sft --quant_method none --quant_bits 4", "--quant_method none loads the base unquantized; drop --quant_bits 4 "
                                               "or pass --quant_method bnb."),
    ("sft --quant_bits 4 --bnb_4bit_compute_dtype int8",
     "--bnb_4bit_compute_dtype int8 is not one of bfloat16, float16, float32."),
    ("sft --quant_bits 8 --train_type full", "--train_type full cannot train a base quantized to 8 bits (its weights "
                                             "are frozen integers): drop --quant_bits for full fine-tuning, or train "
                                             "LoRA on the quantized base."),
    ("infer --query hi --adapters CKPT --merge_lora true", MERGE),
    ("infer --query hi --adapters CKPT --quant_bits 4 --merge_lora true", MERGE),
    ("export --adapters CKPT --merge_lora true --quant_bits 4",
     "export writes full-precision weights and does not quantize (--quant_bits 4); leave --quant_method/--quant_bits "
     "out: a LoRA trained on a quantized base merges into the unquantized one."),
])
def test_bad_quantization_flags_are_one_sentence(tmp_path, capsys, monkeypatch, argv, sentence):
    from tunesmith.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.json").write_text(json.dumps(TUTORIAL_ROWS, ensure_ascii=False))
    ckpt = _fake_4bit_checkpoint(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    command, *flags = argv.replace("CKPT", str(ckpt)).split()
    extra = ["--dataset", "good.json", "--model", "smollm2-135m-instruct"] if command == "sft" else []
    assert main([command, *extra, *flags]) == 1
    assert capsys.readouterr().err == f"error: {sentence}\n"
    assert sorted(tmp_path.rglob("*")) == before  # refused before anything was written


def test_merging_into_a_quantized_model_is_refused():
    from tunesmith.model.lora import merge_lora

    model = nn.Module()
    model.proj = LoRALinear(QuantLinear.from_linear(linear(), QuantConfig(8)))
    model.proj.add_adapter("default", LoraConfig(r=2))
    with pytest.raises(UserError) as e:
        merge_lora(model)
    assert str(e.value) == MERGE.replace("4 bits", "8 bits")
