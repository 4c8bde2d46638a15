"""AdamW for the training loop: torch's own fused AdamW kernel (`torch._fused_adamw_`, what
`torch.optim.AdamW(fused=True)` runs, on CUDA and CPU), driven without torch.optim.

Why not torch.optim: its Optimizer methods are wrapped in `torch._disable_dynamo`, so the first one called
(`add_param_group`, in its constructor) imports torch._dynamo, and with it sympy and most of the compiler: 3.8 s of
the tutorial's 10-step seed job on the H200 (bench/seed_job.py --model-dir DIR --profile, 2026-12-01), for a run
that never compiles. The update is the same kernel with the same arguments, so the parameters match
torch.optim.AdamW(fused=True) bit for bit (tests/test_sft.py), and `state_dict()` has torch's layout (integer
parameter ids, `step` / `exp_avg` / `exp_avg_sq`), so checkpoints load in either. LoRA runs use it; full
fine-tuning keeps torch.optim (train/loop.py: its FSDP checkpoints hold DCP-sharded optimizer state, whose
state-dict functions take only torch.optim's).
"""

from __future__ import annotations

import torch


class AdamW:
    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        # torch.optim.AdamW(fused=True)'s group keys, so that its load_state_dict takes ours as its own
        torch_keys = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                      "fused": True, "decoupled_weight_decay": True}
        self.param_groups = [{"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0.0, **torch_keys, **g,
                              "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            by_kind: dict[tuple, list[torch.Tensor]] = {}  # one kernel launch per (device, dtype), as torch groups
            for p in g["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            beta1, beta2 = g["betas"]
            for params in by_kind.values():
                states = [self._state(p) for p in params]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                    [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=g["lr"],
                                    beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"],
                                    maximize=g["maximize"], grad_scale=None, found_inf=None)

    def _state(self, p: torch.Tensor) -> dict:
        s = self.state.get(p)
        if s is None:  # torch's fused layout: a float32 step counter on the parameter's device
            s = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return s

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        ids, groups = {}, []
        for g in self.param_groups:
            for p in g["params"]:
                ids.setdefault(id(p), len(ids))
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [ids[id(p)] for p in g["params"]]})
        state = {ids[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """torch's layout, written by this class or by torch.optim.AdamW (fused or not)."""
        saved = sd["param_groups"]
        if len(saved) != len(self.param_groups) or any(len(a["params"]) != len(b["params"])
                                                       for a, b in zip(saved, self.param_groups)):
            raise ValueError("the optimizer state does not match these parameters (another model or adapter?)")
        by_id = {}
        for mine, theirs in zip(self.param_groups, saved):
            by_id.update(zip(theirs["params"], mine["params"]))
            mine.update({k: v for k, v in theirs.items() if k in ("lr", "betas", "eps", "weight_decay")})
        self.state = {}
        for i, s in sd["state"].items():
            p = by_id[int(i)]
            self.state[p] = {  # copies: a live optimizer's state_dict holds its own tensors
                "step": torch.as_tensor(s["step"], dtype=torch.float32).to(p.device, copy=True).reshape(()),
                "exp_avg": s["exp_avg"].to(p.device, p.dtype, copy=True),
                "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype, copy=True)}
