"""The static-KV-cache decoder that generation runs (decode/static.py) against the textbook forward, on the tiny
random checkpoints of tiny_models.py (fp32, CPU): prefill + chunked/single-token decode equals one full forward;
fused q/k/v and gate/up projections equal the separate ones (with LoRA, merge, gradients, dtype moves).
The Generator's static-cache path on the real model is tests/test_generate.py."""
# ruff: noqa: F811
# (the `tiny` fixture is imported from tiny_models; pyflakes sees the tests' `tiny` parameter as a redefinition)

from __future__ import annotations

import torch

from tiny_models import random_ids as _ids, tiny  # noqa: F401 (tiny: a fixture)
from tunesmith.model.load import load_model


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
