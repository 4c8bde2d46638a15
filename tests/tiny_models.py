"""Tiny random checkpoints of the architectures tunesmith loads, written by transformers' `save_pretrained`
(unsharded and sharded), for the tests of the decoder and loaders (test_model.py), of LoRA (test_lora.py) and of
the static-cache decoder (test_static.py). A test module that imports the `tiny` fixture gets it once per
architecture (module scope)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

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


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
