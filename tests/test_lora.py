"""LoRA (model/lora.py) on the tiny random checkpoints of tiny_models.py (fp32, CPU): the fused LoRA path and the
compiled training path equal module by module (loss and every LoRA gradient, with fewer matrix products), and
row adapters (one adapter per batch row) equal each row alone. Merging and PEFT files are also covered by
tests/test_static.py (merge into fused projections), tests/test_export.py and tests/test_sft.py."""
# ruff: noqa: F811
# (the `tiny` fixture is imported from tiny_models; pyflakes sees the tests' `tiny` parameter as a redefinition)

from __future__ import annotations

import torch

from tiny_models import random_ids as _ids, tiny  # noqa: F401 (tiny: a fixture)
from tunesmith.model.load import load_model


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
