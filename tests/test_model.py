"""The decoder and the loaders against transformers, the reference implementation.

- Logit parity (fp32, CPU): tiny random Qwen2 (q/k/v bias, tied and untied), Llama (GQA, llama3 rope scaling),
  Qwen3 (q/k norm, head_dim != hidden/heads) and Mistral checkpoints written by `save_pretrained`, unsharded and
  sharded, loaded through tunesmith's `load_model`.
- Packed rows equal separate samples; KV-cache prefill + chunked/single-token decode equals one full forward.
- The bundled SmolLM2 GGUF: our reader equals the `gguf` package's, our logits equal transformers' GGUF loading of
  the same file, and the model answers a question.
- Our safetensors reader equals safetensors' load_file (every dtype, 0-d/empty/odd tensors, tensors spread over
  many chunks, casts), and a damaged header is one UserError naming the file.
- Bad inputs are one UserError naming the path, and the CLI prints it without a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from tunesmith.errors import UserError
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.model import load as load_mod
from tunesmith.model.load import load_model, read_safetensors, resolve_model_path

VOCAB = 320
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

# name -> (transformers config class, its extra fields)
CONFIGS = {
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen2-tied": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-gqa": (transformers.LlamaConfig, dict(
        num_key_value_heads=1, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None,
                                                 tie_word_embeddings=False)),
}
PARITY_ATOL = 1e-4  # fp32 on CPU; measured max |diff| is ~1e-6 (same math, different op order)


def write_tiny_tokenizer(folder: Path) -> None:
    """A 256-byte byte-level BPE with ChatML specials: load_model needs tokenizer.json; parity needs only ids."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(byte_chars))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves biases at 0 and norms at 1, which would hide a missing bias or norm: perturb everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise if p.ndim == 1 else 0.08 * noise)


def make_tiny(name: str, root: Path):
    """(transformers model, {"unsharded": folder, "sharded": folder}) of one CONFIGS entry, random weights."""
    cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cls(**TINY, **extra), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    randomize(hf, seed=list(CONFIGS).index(name))
    folders = {}
    for kind, shard in (("unsharded", "50MB"), ("sharded", "40KB")):
        folders[kind] = root / name / kind
        hf.save_pretrained(folders[kind], max_shard_size=shard)
        write_tiny_tokenizer(folders[kind])
    assert (folders["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(folders["sharded"].glob("*.safetensors"))) > 2
    return hf, folders


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    return (request.param, *make_tiny(request.param, tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return make_tiny("llama3-gqa", tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory) -> Path:
    """A sharded tiny Qwen2 folder, the starting point of the damaged-folder tests."""
    return make_tiny("qwen2", tmp_path_factory.mktemp("qwen2"))[1]["sharded"]


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["unsharded", "sharded"])
def test_logits_match_transformers(tiny, kind):
    name, hf, folders = tiny
    lm = load_model(folders[kind])
    assert lm.model.config.tie_embeddings == hf.config.tie_word_embeddings
    ids = _ids(2, 23)
    with torch.no_grad():
        want = hf(ids).logits
        got = lm.model.logits(lm.model(ids))
    assert got.shape == want.shape == (2, 23, VOCAB)
    assert (got - want).abs().max().item() <= PARITY_ATOL, name


def test_llama31_style_config_json(llama3, tmp_path):
    """Hub Llama 3.1 folders (saved by transformers 4.x) spell the rope settings `rope_theta` + `rope_scaling`."""
    hf, folders = llama3
    folder = tmp_path / "llama31"
    shutil.copytree(folders["unsharded"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = load_model(folder)
    assert lm.model.config.rope_scaling["rope_type"] == "llama3"
    ids = _ids(1, 40, seed=1)
    with torch.no_grad():
        assert (lm.model.logits(lm.model(ids)) - hf(ids).logits).abs().max().item() <= PARITY_ATOL


def test_packed_rows_equal_separate_samples(tiny):
    _, _, folders = tiny
    model = load_model(folders["unsharded"]).model
    lengths = [[5, 9, 3], [7, 10]]  # two rows of 17 tokens, different boundaries
    ids = _ids(2, 17, seed=2)
    seq_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    with torch.no_grad():
        packed = model(ids, position_ids=positions, seq_ids=seq_ids)
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(ids[r : r + 1, start : start + n])[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, atol=1e-5, rtol=1e-5)
                start += n


def test_static_cache_prefill_and_decode_equal_full_forward(tiny):
    """Generation's forward over a static KV cache (decode/static.py): a prefill, a 4-token chunk (queries attend
    to the cache and causally among themselves), then one token at a time, give the logits of the textbook
    forward over the whole sequence."""
    from tunesmith.decode.static import StaticDecoder, StaticKVCache

    _, _, folders = tiny
    model = load_model(folders["unsharded"]).model
    ids = _ids(2, 16, seed=3)
    dec = StaticDecoder(model)
    with torch.no_grad():
        full = model.logits(model(ids))
        cache = StaticKVCache(model.config, batch=2, max_len=24, device="cpu", dtype=torch.float32)
        got = {5: dec.prefill(ids[:, :6], cache)}
        got[9] = dec.forward(ids[:, 6:10], torch.arange(6, 10).expand(2, 4), cache)
        for t in range(10, 16):
            got[t] = dec.forward(ids[:, t : t + 1], torch.full((2, 1), t), cache)
    for t, logits in got.items():
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5, msg=str(t))


def test_fused_projections_equal_separate_ones(tiny, tmp_path):
    """Generation's fused q/k/v and gate/up matrices: same logits, no second copy of the weights, skipped while a
    LoRA adapter is active or gradients are wanted, current after a merge, rebuilt after a dtype move."""
    from tunesmith.decode.static import fuse_projections
    from tunesmith.export.hf import save_hf_folder
    from tunesmith.model.lora import LoraConfig, apply_lora, merge_lora

    name, _, folders = tiny
    lm = load_model(folders["unsharded"])
    model = lm.model
    ids = _ids(2, 11, seed=4)
    logits = lambda: model.logits(model(ids))  # noqa: E731
    with torch.no_grad():
        separate = logits()
        fuse_projections(model)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.inputs.weight.shape[0] == attn.q_proj.weight.shape[0] + 2 * attn.k_proj.weight.shape[0]
        assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.inputs.weight.untyped_storage().data_ptr()
        assert (attn.inputs.bias is not None) == (name.startswith("qwen2"))  # Qwen2 has q/k/v biases
        assert model.state_dict().keys() == load_model(folders["unsharded"]).model.state_dict().keys()
        torch.testing.assert_close(logits(), separate, atol=1e-5, rtol=1e-5)

        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B["default"].weight.normal_(0, 0.05)
        with_lora = logits()  # the adapter is active: it runs beside the fused matrices (FusedInputs)
        assert (with_lora - separate).abs().max() > 1e-3
        merge_lora(model)  # in place into the views: the fused matrices carry the merge
        torch.testing.assert_close(logits(), with_lora, atol=1e-4, rtol=1e-4)
        save_hf_folder(lm, tmp_path / "merged")  # q/k/v and gate/up are views of one matrix each here
        reloaded = load_model(tmp_path / "merged").model
        torch.testing.assert_close(reloaded.logits(reloaded(ids)), with_lora, atol=1e-4, rtol=1e-4)

    model.requires_grad_(True)  # as full fine-tuning has it: gradients reach the modules' own weights
    loss = logits().logsumexp(-1).mean()
    loss.backward()
    assert attn.q_proj.weight.grad is not None and mlp.up_proj.weight.grad.abs().sum() > 0

    model.to(torch.float64)  # new storage for every weight: the fused copies are stale until rebuilt
    fuse_projections(model)
    assert attn.inputs.weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(logits().float(), with_lora, atol=1e-4, rtol=1e-4)


class CountLinear(torch.overrides.TorchFunctionMode):
    """Counts F.linear calls (matrix products) made under it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.linear
        return func(*args, **(kwargs or {}))


def _lora_model(folders, alpha: float, seed: int):
    """The tiny unsharded model, frozen, with an r=4 LoRA adapter whose B matrices are random (not zero)."""
    from tunesmith.model.lora import LoraConfig, apply_lora, lora_modules

    model = load_model(folders["unsharded"]).model
    model.requires_grad_(False)
    apply_lora(model, LoraConfig(r=4, alpha=alpha, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.05)
    return model


def _loss_and_grads(model, ids):
    """A logsumexp loss over the logits, and the gradient of every trainable parameter (then cleared)."""
    loss = model.logits(model(ids)).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_fused_lora_equals_module_by_module(tiny):
    """A LoRA run's q/k/v and gate/up through their fused matrices with the adapter stacked beside them
    (decode/static.FusedInputs): the loss and every LoRA gradient of the module-by-module pass, in 12 products a
    layer instead of 21; with dropout the modules run one by one (each its own mask)."""
    from tunesmith.decode.static import fuse_projections
    from tunesmith.model.lora import lora_modules

    _, _, folders = tiny
    model = _lora_model(folders, alpha=8, seed=3)
    ids = _ids(2, 13, seed=6)

    def loss_and_grads():
        count = CountLinear()
        with count:
            loss, grads = _loss_and_grads(model, ids)
        return loss, grads, count.calls

    layers = model.config.num_layers
    model.reset_inputs()
    want, want_grads, separate_calls = loss_and_grads()
    fuse_projections(model)
    got, got_grads, fused_calls = loss_and_grads()
    assert separate_calls == 21 * layers + 1 and fused_calls == 12 * layers + 1  # + lm_head
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 14 * layers
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-4, msg=n)

    for _, m in lora_modules(model):
        m.lora_dropout["default"] = torch.nn.Dropout(0.1)
    assert loss_and_grads()[2] == 21 * layers + 1


def test_compiled_training_stacks_the_lora_a_products(tiny):
    """Compiled LoRA training reads each layer's attention and MLP inputs once for all their adapters' A products
    (lora.StackedLoRA: q/k/v's and gate/up's A matrices stacked, 18 products a layer instead of 21) and gets the
    loss and every LoRA gradient of the module-by-module pass; with the plain slots it runs module by module."""
    from tunesmith.model.lora import stack_lora_inputs

    _, _, folders = tiny
    model = _lora_model(folders, alpha=12, seed=5)
    ids = _ids(2, 11, seed=2)

    def loss_and_grads():
        return _loss_and_grads(model, ids)

    want, want_grads = loss_and_grads()
    graphs = []

    def capture(gm, example_inputs):  # dynamo's graph, run as it is (what inductor would be handed)
        graphs.append(gm)
        return gm.forward

    def products() -> int:
        return sum(n.target is torch.nn.functional.linear for gm in graphs for n in gm.graph.nodes)

    stack_lora_inputs(model)
    for layer in model.model.layers:
        layer.compile(backend=capture, fullgraph=True)
    got, got_grads = loss_and_grads()
    assert graphs and products() == 18 * len(graphs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 14 * model.config.num_layers
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-4, msg=n)

    torch._dynamo.reset()
    graphs.clear()
    model.reset_inputs()
    try:
        loss_and_grads()
    finally:
        torch._dynamo.reset()
    assert graphs and products() == 21 * len(graphs)


def test_row_adapters_equal_each_row_with_its_own_adapter(tiny):
    """A batch whose rows run different adapters in one pass (lora.RowAdapters: two adapters of different ranks,
    scalings and target modules, and a row with none) gives each row the logits it gets alone with its adapter;
    after an adapter's weights change, refresh() follows them."""
    from tunesmith.model.lora import LoraConfig, RowAdapters, apply_lora, lora_modules, set_active_adapter

    name, _, folders = tiny
    model = load_model(folders["unsharded"]).model
    wrapped = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), "a")
    apply_lora(model, LoraConfig(r=2, alpha=6, dropout=0.0), "b",
               targets=[n for n in wrapped if n.endswith(("q_proj", "down_proj"))])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for B in m.lora_B.values():
                B.weight.copy_(torch.randn(B.weight.shape, generator=g) * 0.05)
    ids = _ids(3, 9, seed=5)
    adapters = ["b", None, "a"]

    def alone() -> torch.Tensor:
        out = []
        for row, adapter in enumerate(adapters):
            set_active_adapter(model, adapter)
            out.append(model.logits(model(ids[row : row + 1]))[0])
        return torch.stack(out)

    with torch.no_grad():
        want = alone()
        assert (want[0] - want[2]).abs().max() > 1e-3  # the adapters differ
        rows = RowAdapters(model, 3, "cpu", torch.float32)
        rows.assign(adapters)
        set_active_adapter(model, rows)
        torch.testing.assert_close(model.logits(model(ids)), want, atol=2e-5, rtol=2e-5)

        for _, m in lora_modules(model):  # train a little more, in place
            m.lora_B["a"].weight.mul_(-2.0)
        want = alone()
        rows.refresh()
        set_active_adapter(model, rows)
        torch.testing.assert_close(model.logits(model(ids)), want, atol=2e-5, rtol=2e-5)


# ---- GGUF ---------------------------------------------------------------------------------------------------


def test_gguf_reader_matches_gguf_package(tmp_path):
    """Every metadata value type and every tensor type we dequantize ourselves (plus Q5_0, which goes through
    gguf.quants) reads exactly as gguf.GGUFReader + gguf.quants.dequantize read it."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    path = tmp_path / "all_types.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <|im_end|> 你好")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "Ġthe", "你"])
    rng = np.random.default_rng(0)
    types = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
             "q5_0": Q.Q5_0}
    for name, qtype in types.items():
        x = rng.normal(size=(3, 96)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.add_tensor("vector", rng.normal(size=7).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    want_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want_meta
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        want = want.reshape([int(d) for d in reversed(t.shape)])
        got = ours.read(t.name)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
        np.testing.assert_array_equal(got.numpy(), want, err_msg=t.name)


@pytest.fixture(scope="module")
def hf_smollm():
    """transformers' own GGUF loading of the bundled file (dequantized to fp32 with the gguf package)."""
    path = resolve_model_path("smollm2-135m-instruct")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


# Both sides dequantize the same Q4_1/Q8_0 blocks to the same fp32 weights, so only fp32 op order differs:
# the measured max |diff| over these ~40 positions x 49k logits is ~2e-5 on logits of magnitude ~20.
GGUF_ATOL = 1e-3


@pytest.mark.slow  # ~13 s: transformers' GGUF load
def test_smollm_logits_match_transformers_gguf(smollm, hf_smollm):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = torch.tensor([smollm.template.prompt_ids(messages)])
    with torch.no_grad():
        want = hf_smollm(ids).logits
        got = smollm.model.logits(smollm.model(ids))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= GGUF_ATOL
    assert torch.equal(got[0, -1].argmax(), want[0, -1].argmax())


def test_smollm_answers_capital_of_france(smollm):
    from tunesmith.decode.generator import Generator
    from tunesmith.decode.sampling import SamplingConfig

    prompt = smollm.template.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    out = Generator(smollm).complete(prompt, SamplingConfig(max_new_tokens=20, temperature=0.0))
    assert "Paris" in out.text


# ---- bad input ----------------------------------------------------------------------------------------------


def _user_error(path: Path) -> str:
    with pytest.raises(UserError) as e:
        load_model(path)
    assert str(path) in str(e.value)
    return str(e.value)


def test_missing_folder(tmp_path):
    assert "not found" in _user_error(tmp_path / "no-such-model")


def test_folder_without_weights(qwen2_folder, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen2_folder / f, folder / f)
    assert "safetensors" in _user_error(folder)


def test_unsupported_architecture(qwen2_folder, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(qwen2_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "GPT2LMHeadModel" in _user_error(folder)


def test_truncated_safetensors_shard(qwen2_folder, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(qwen2_folder, folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError) as e:
        load_model(folder)
    assert str(shard) in str(e.value) and "truncated" in str(e.value)


# ---- safetensors reader -------------------------------------------------------------------------------------


def _odd_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the reader maps, with odd byte sizes, 0-d and empty tensors."""
    g = torch.Generator().manual_seed(7)
    ints = lambda dt, lo, hi, shape: torch.randint(lo, hi, shape, generator=g, dtype=dt)  # noqa: E731
    return {
        "bf16": torch.randn(37, 5, generator=g).bfloat16(),
        "f16": torch.randn(3, 1, 7, generator=g).half(),
        "f32": torch.randn(1001, generator=g),
        "f64": torch.randn(2, 9, generator=g, dtype=torch.float64),
        "i64": ints(torch.int64, -(2**62), 2**62, (13,)),
        "i32": ints(torch.int32, -(2**31), 2**31 - 1, (3, 3)),
        "i16": ints(torch.int16, -(2**15), 2**15 - 1, (5,)),
        "i8": ints(torch.int8, -128, 127, (7, 3)),
        "u8": ints(torch.uint8, 0, 256, (5, 11)),
        "bool": torch.rand(19, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
    }


@pytest.fixture
def odd_file(tmp_path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file(_odd_tensors(), str(path), metadata={"format": "pt", "note": "__metadata__ is not a tensor"})
    return path


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape and torch.equal(got[k], w), k


def _folder_state(folder: Path, dtype=None) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update({k: v.to(dtype) if dtype else v for k, v in load_file(str(f)).items()})
    return state


def test_safetensors_reader_equals_load_file(odd_file, qwen2_folder):
    from safetensors.torch import load_file

    want = load_file(str(odd_file))
    _assert_same(read_safetensors([odd_file], "cpu"), want)
    _assert_same(read_safetensors([odd_file], "cpu", torch.float32, workers=1),
                 {k: v.float() for k, v in want.items()})
    assert len(list(qwen2_folder.glob("*.safetensors"))) > 2
    for dtype in (None, "bfloat16"):  # None: float32 on CPU, the file's own dtype; bfloat16: cast while reading
        lm = load_model(qwen2_folder, dtype)
        _assert_same(lm.model.state_dict(), _folder_state(qwen2_folder, torch.bfloat16 if dtype else None))


@pytest.mark.parametrize("chunk", [8, 24])
def test_safetensors_reader_chunks(odd_file, qwen2_folder, monkeypatch, chunk):
    """Tiny chunks: every tensor over 8 bytes spans several reads (several workers), with and without a cast."""
    from safetensors.torch import load_file

    reads, read_into = [], load_mod._read_into

    def counted(f, offset, buf):
        reads.append(len(buf))
        read_into(f, offset, buf)

    monkeypatch.setattr(load_mod, "_read_into", counted)
    monkeypatch.setattr(load_mod, "CHUNK_BYTES", chunk)
    want = load_file(str(odd_file))
    _assert_same(read_safetensors([odd_file], "cpu"), want)
    assert max(reads) == chunk and len(reads) > 2 * len(want)
    _assert_same(read_safetensors([odd_file], "cpu", torch.float64), {k: v.double() for k, v in want.items()})

    monkeypatch.setattr(load_mod, "CHUNK_BYTES", 4096 + chunk)  # the model's tensors are 256 B to 80 KB
    reads.clear()
    lm = load_model(qwen2_folder)
    _assert_same(lm.model.state_dict(), _folder_state(qwen2_folder))
    assert max(reads) == 4096 + chunk and len(reads) > 2 * len(lm.model.state_dict())


def _edit_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def _damaged_error(path: Path) -> str:
    with pytest.raises(UserError) as e:
        read_safetensors([path], "cpu")
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg


def test_damaged_safetensors_headers(odd_file, qwen2_folder, tmp_path):
    raw = odd_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    damaged = "the safetensors file is damaged or truncated"

    def variant(name: str, data: bytes | None = None, edit=None) -> Path:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(raw if data is None else data)
        if edit:
            _edit_header(path, edit)
        return path

    beyond = variant("beyond", edit=lambda h: h["u8"].update(shape=[10**6], data_offsets=[0, 10**6]))
    assert damaged in _damaged_error(beyond) and "tensor u8 ends at byte" in _damaged_error(beyond)
    mismatch = variant("mismatch", edit=lambda h: h["f32"].update(shape=[1000]))
    assert damaged in _damaged_error(mismatch) and "tensor f32" in _damaged_error(mismatch)
    not_json = variant("not_json", raw[:8] + b"{not json" + b" " * (n - 9) + raw[8 + n :])
    assert damaged in _damaged_error(not_json) and "not JSON" in _damaged_error(not_json)
    too_long = variant("too_long", (len(raw) + 1).to_bytes(8, "little") + raw[8:])
    assert damaged in _damaged_error(too_long)
    assert damaged in _damaged_error(variant("empty", b""))
    assert damaged in _damaged_error(variant("no_offsets", edit=lambda h: h["bool"].pop("data_offsets")))
    assert damaged in _damaged_error(variant("negative", edit=lambda h: h["bool"].update(shape=[-19])))
    fp8 = _damaged_error(variant("fp8", edit=lambda h: h["u8"].update(dtype="F8_E4M3")))
    assert "tensor u8 has dtype F8_E4M3" in fp8 and damaged not in fp8

    folder = tmp_path / "bad-header"  # through load_model: the shard is named, one sentence
    shutil.copytree(qwen2_folder, folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    _edit_header(shard, lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=[0, 10**9]))
    msg = _user_error(folder)
    assert msg.startswith(f"{shard}: {damaged}") and msg.endswith("; re-download or re-save it.")


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_of_unknown_architecture(tmp_path):
    assert "'bloom'" in _user_error(_write_gguf(tmp_path / "bloom.gguf", "bloom"))


def test_damaged_gguf_files(tmp_path):
    good = _write_gguf(tmp_path / "good.gguf", "llama")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("this is not a model\n" * 10)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-40])  # tensor data cut short
    header_cut = tmp_path / "header_cut.gguf"
    header_cut.write_bytes(good.read_bytes()[:30])
    for p in (empty, not_gguf, cut, header_cut):
        _user_error(p)
    assert "truncated" in _user_error(cut)


@pytest.mark.slow  # the tunesmith CLI in a subprocess
def test_cli_prints_load_errors_without_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    r = subprocess.run([sys.executable, "-m", "tunesmith", "infer", "--model", str(missing), "--query", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert str(missing) in r.stderr and r.stderr.startswith("error: ")


def test_a_device_this_machine_cannot_use_is_one_sentence(tmp_path, capsys, monkeypatch):
    from tunesmith.cli import main
    from tunesmith.model.load import pick_device

    assert pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"^--device 'gpu' is not a device; use cpu, cuda or cuda:N\.$"):
        pick_device("gpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UserError, match=rf"^--device cuda:{gpus}: this machine has "):
        pick_device(f"cuda:{gpus}")  # one past the last GPU, or any GPU where there is none
    if gpus == 0:  # before: torch's "AssertionError: Torch not compiled with CUDA enabled" traceback
        monkeypatch.chdir(tmp_path)
        (tmp_path / "d.json").write_text('[{"instruction": "hi", "output": "hello"}]')
        for argv in (["sft", "--dataset", "d.json"], ["infer", "--query", "hi"], ["export", "--to_gguf", "true", "--output_dir", "exported"]):
            assert main([argv[0], "--model", "smollm2-135m-instruct", "--device", "cuda", *argv[1:]]) == 1
            err = capsys.readouterr().err
            assert err.startswith("error: --device cuda: this machine has no usable CUDA GPU") and err.count("\n") == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
