"""Can vLLM serve this LoRA checkpoint with `--enable-lora`? A short report ending in the command that serves it.

vLLM's LoRA layers cover the decoder projections only; it refuses adapters with `modules_to_save`, DoRA, or a
bias other than 'none', and needs `--max-lora-rank` (default 16) to be one of its supported ranks and at least
the adapter's rank. It serves LoRA on HF model folders, never on GGUF files.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunesmith.model.lora import ALL_LINEAR, check_adapter_config, read_adapter_config, read_adapter_weights
from tunesmith.runs import read_checkpoint_args

SUPPORTED_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


def adapted_modules(ckpt: Path) -> list[str]:
    """Short names (q_proj, lm_head, ...) of the modules the adapter file holds LoRA weights for."""
    f = Path(ckpt) / "adapter_model.safetensors"
    if not f.is_file():
        return []
    keys = list(read_adapter_weights(ckpt))  # the whole file, so a truncated one is refused here (one sentence)
    return sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k})


def serve_name(ckpt_args: dict) -> str:
    """The run's --model_name (its last, English, form) as a vLLM model name; 'adapter' when the run had none."""
    names = ckpt_args.get("model_name") or []
    name = names[-1] if isinstance(names, list) and names else names if isinstance(names, str) else ""
    slug = re.sub(r"[^a-z0-9._-]+", "-", str(name).lower()).strip("-")
    return slug or "adapter"


def vllm_report(ckpt: str | Path) -> str:
    ckpt = Path(ckpt)
    cfg = read_adapter_config(ckpt)
    check_adapter_config(cfg, ckpt)
    ckpt_args = read_checkpoint_args(ckpt)
    base = str(ckpt_args.get("model") or cfg.get("base_model_name_or_path") or "BASE_MODEL")
    name = serve_name(ckpt_args)

    targets = cfg.get("target_modules") or []
    modules = set(adapted_modules(ckpt)) | (set(targets) if isinstance(targets, list) else set())
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"it is a {cfg.get('peft_type')} adapter, not LoRA")
    unsupported = sorted(m for m in modules if m not in ALL_LINEAR)
    if unsupported:
        problems.append(f"it adapts {', '.join(unsupported)}, but vLLM's LoRA covers only {', '.join(ALL_LINEAR)}")
    if cfg.get("modules_to_save"):
        problems.append(f"it fully trains {', '.join(cfg['modules_to_save'])} (modules_to_save)")
    if cfg.get("use_dora"):
        problems.append("it is a DoRA adapter")
    if cfg.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias '{cfg['bias']}'; vLLM needs 'none')")
    rank = max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])
    max_rank = next((r for r in SUPPORTED_RANKS if r >= rank), None)
    if max_rank is None:
        problems.append(f"its rank {rank} is above vLLM's largest --max-lora-rank ({SUPPORTED_RANKS[-1]})")

    merged = f"{str(ckpt).rstrip('/')}-merged"
    if problems:
        return (f"vLLM check of {ckpt}: vLLM --enable-lora would refuse this adapter: {'; '.join(problems)}.\n"
                f"Merge it and serve the merged model instead:  tunesmith export --adapters {ckpt} --merge_lora true\n"
                f"vllm serve {merged}")
    lines = [f"vLLM check of {ckpt}: servable with --enable-lora (LoRA r={rank}, targets {', '.join(sorted(modules))}; "
             f"no modules_to_save, no DoRA, bias 'none')."]
    if rank not in SUPPORTED_RANKS:
        lines.append(f"Rank {rank} is not one of vLLM's ranks {SUPPORTED_RANKS}: --max-lora-rank {max_rank} covers it.")
    if base.lower().endswith(".gguf"):
        hf_base = base[: -len(".gguf")] + "-hf"
        lines += [f"The base {base} is a GGUF file; vLLM needs the HF model folder. Either merge and serve the "
                  f"result:  tunesmith export --adapters {ckpt} --merge_lora true  then  vllm serve {merged}",
                  f"or write the base as an HF folder ({hf_base}) with  tunesmith export --model {base}  and serve "
                  f"the adapter on it:"]
        base = hf_base
    else:
        lines.append(f'Serve it (OpenAI API on http://localhost:8000/v1, model "{name}"):')
    lines.append(f"vllm serve {base} --enable-lora --lora-modules {name}={ckpt} --max-lora-rank {max_rank}")
    return "\n".join(lines)
