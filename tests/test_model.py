"""The decoder and the loaders against transformers, the reference implementation.

- Logit parity (fp32, CPU): tiny random Qwen2 (q/k/v bias, tied and untied), Llama (GQA, llama3 rope scaling),
  Qwen3 (q/k norm, head_dim != hidden/heads) and Mistral checkpoints written by `save_pretrained`, unsharded and
  sharded, loaded through tunesmith's `load_model`.
- Packed rows equal separate samples. (The tiny checkpoints come from tiny_models.py; LoRA on them is
  test_lora.py, the static-cache decoder test_static.py.)
- The bundled SmolLM2 GGUF: our reader equals the `gguf` package's, our logits equal transformers' GGUF loading of
  the same file, and the model answers a question.
- Our safetensors reader equals safetensors' load_file (every dtype, 0-d/empty/odd tensors, tensors spread over
  many chunks, casts), and a damaged header is one UserError naming the file.
- Bad inputs are one UserError naming the path, and the CLI prints it without a traceback.
"""
# ruff: noqa: F811
# (the `tiny` fixture is imported from tiny_models; pyflakes sees the tests' `tiny` parameter as a redefinition)

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

from tiny_models import VOCAB, make_tiny, random_ids as _ids, tiny  # noqa: F401 (tiny: a fixture)
from tunesmith.errors import UserError
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.model import load as load_mod
from tunesmith.model.load import load_model, read_safetensors, resolve_model_path

PARITY_ATOL = 1e-4  # fp32 on CPU; measured max |diff| is ~1e-6 (same math, different op order)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return make_tiny("llama3-gqa", tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory) -> Path:
    """A sharded tiny Qwen2 folder, the starting point of the damaged-folder tests."""
    return make_tiny("qwen2", tmp_path_factory.mktemp("qwen2"))[1]["sharded"]


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
    want = load_file(str(odd_file))
    _assert_same(read_safetensors([odd_file], "cpu", chunk_bytes=chunk), want)
    assert max(reads) == chunk and len(reads) > 2 * len(want)
    _assert_same(read_safetensors([odd_file], "cpu", torch.float64, chunk_bytes=chunk),
                 {k: v.double() for k, v in want.items()})

    reads.clear()  # a model folder's shards, the model's tensors being 256 B to 80 KB
    state = read_safetensors(sorted(qwen2_folder.glob("*.safetensors")), "cpu", chunk_bytes=4096 + chunk)
    _assert_same(state, _folder_state(qwen2_folder))
    assert max(reads) == 4096 + chunk and len(reads) > 2 * len(state)
    _assert_same(load_model(qwen2_folder).model.state_dict(), _folder_state(qwen2_folder))


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
