"""Shared helpers of the optimizer tests: a float64 oracle of MoLF written from docs/method.md section 3
with plain tensors, and the check of a MoLFAdamW run against it.

The oracle shares nothing with molf: its own forward pass (x W^T + b + sum_i s_i B_i A_i x), its
own moments, scores, top-k and AdamW update. Parameters and moments must agree within 1e-10.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

import molf

B1, B2, EPS = 0.9, 0.999, 1e-8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


class Oracle:
    """Plain-tensor MoLF in float64."""

    def __init__(self, net, ranks, alphas, train_base, lrs, wds, lr_other, wd_other, score, k):
        def copy(t):
            return t.detach().clone().double().requires_grad_(True)

        self.mods = {}
        for name in ("fc1", "fc2"):
            m = getattr(net, name)
            self.mods[name] = {
                "W": copy(m.base_layer.weight),
                "b": copy(m.base_layer.bias),
                "A": [copy(a) for a in m.lora_A],
                "B": [copy(b) for b in m.lora_B],
                "s": [a / math.sqrt(r) for r, a in zip(ranks, alphas)],
            }
        self.other = {
            "ln_w": copy(net.norm.weight),
            "ln_b": copy(net.norm.bias),
            "head_w": copy(net.head.weight),
            "head_b": copy(net.head.bias),
        }
        self.train_base, self.lrs, self.wds = train_base, lrs, wds
        self.lr_other, self.wd_other, self.score, self.k = lr_other, wd_other, score, k
        self.state = {}
        self.decisions = []

    def linear(self, name, x):
        d = self.mods[name]
        y = x @ d["W"].T + d["b"]
        for s, a, b in zip(d["s"], d["A"], d["B"]):
            y = y + s * (x @ a.T @ b.T)
        return y

    def forward(self, x):
        h = self.linear("fc1", x)
        h = nn.functional.layer_norm(h, (8,), self.other["ln_w"], self.other["ln_b"])
        h = self.linear("fc2", torch.tanh(h))
        return torch.tanh(h) @ self.other["head_w"].T + self.other["head_b"]

    def experts(self, name):
        d = self.mods[name]
        es = [[d["W"], d["b"]]] if self.train_base else []
        return es + [[a, b] for a, b in zip(d["A"], d["B"])]

    def moments(self, p):
        st = self.state.setdefault(
            id(p), {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "t": 0}
        )
        st["m"] = B1 * st["m"] + (1 - B1) * p.grad
        st["v"] = B2 * st["v"] + (1 - B2) * p.grad**2
        st["t"] += 1
        return st

    def adam(self, p, lr, wd):
        st = self.state[id(p)]
        with torch.no_grad():
            p.mul_(1 - lr * wd)
            m_hat = st["m"] / (1 - B1 ** st["t"])
            v_hat = st["v"] / (1 - B2 ** st["t"])
            p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))

    def step(self, x, y, lr_factor):
        for p in self.params():
            p.grad = None
        loss = ((self.forward(x) - y) ** 2).mean()
        loss.backward()
        lrs = [lr * lr_factor for lr in self.lrs]
        step_decisions = {}
        for name in self.mods:
            experts = self.experts(name)
            scores = []
            for e, params in enumerate(experts):
                sts = [self.moments(p) for p in params]
                n = sum(p.numel() for p in params)
                if self.score == "epd":
                    tot = sum((st["m"] ** 2 / (st["v"].sqrt() + EPS)).sum() for st in sts)
                    scores.append(float(lrs[e] / n * tot))
                else:
                    tot = sum(((st["m"] / (st["v"].sqrt() + EPS)) ** 2).sum() for st in sts)
                    scores.append(float(tot.sqrt() / math.sqrt(n)))
            order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
            winners = sorted(order[: self.k])
            step_decisions[name] = winners
            for e in winners:
                for p in experts[e]:
                    # a wrapped layer's bias is not decayed (docs/method.md section 3)
                    wd = 0.0 if p is self.mods[name]["b"] else self.wds[e]
                    self.adam(p, lrs[e], wd)
        for key, p in self.other.items():
            self.moments(p)
            self.adam(p, self.lr_other * lr_factor, self.wd_other if key == "head_w" else 0.0)
        self.decisions.append(step_decisions)

    def params(self):
        out = list(self.other.values())
        for d in self.mods.values():
            out += [d["W"], d["b"], *d["A"], *d["B"]]
        return out


def step_on_random_grads(runs, steps, seed=0):
    """Step every (model, optimizer) of `runs` on the same random gradients, of a random scale
    per tensor so that routing varies, set directly: no forward pass that could drift apart."""
    params = [[p for p in m.parameters() if p.requires_grad] for m, _ in runs]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [
            torch.randn(p.shape, generator=g) * 10 ** (-4 + 2 * torch.rand((), generator=g))
            for p in params[0]
        ]
        for (_, opt), ps in zip(runs, params):
            for p, grad in zip(ps, grads):
                p.grad = grad.to(p.dtype)
            opt.step()


def case_id(case) -> str:
    return f"{case[0]}-{case[1]}-k{case[2]}-{case[3]}"


CASES = [
    # ranks, train_base, k, score, LoRA learning rate(s) chosen so that routing switches
    ((3,), True, 1, "epd", 8e-3),
    ((3,), True, 1, "pfn", 2e-2),
    ((2, 4), True, 2, "epd", (5e-3, 5e-3)),
    ((2, 4), True, 1, "pfn", (2e-2, 8e-3)),
    ((2, 4), False, 1, "epd", (5e-3, 5e-3)),
]


def check_against_oracle(
    ranks, train_base, k, score, lr_lora, device: str = "cpu", during_step=None, log=True
) -> molf.MoLFAdamW:
    """Train a small wrapped float64 net for 8 steps with MoLFAdamW (on `device`; the oracle stays
    on the CPU) and with the oracle: the same parameters, moments and (with the routing `log`)
    routing decisions at the end; returns the optimizer. `during_step`, a context manager
    factory, wraps every step."""
    torch.manual_seed(0)
    net = Net().double()
    alphas = tuple(2.0 * (i + 1) for i in range(len(ranks)))
    cfg = molf.MoLFConfig(
        lora_ranks=ranks,
        lora_alphas=alphas,
        lora_dropout=0.0,
        target_modules=["fc1", "fc2"],
        train_base=train_base,
        freeze_non_wrapped=False,
    )
    molf.wrap(net, cfg)
    with torch.no_grad():  # non-zero B so that A gets gradients from the start too
        for m in molf.molf_modules(net).values():
            for b in m.lora_B:
                b.normal_(0, 0.1)
    lr_fft, wd_fft, wd_lora = 3e-3, 0.1, 0.01
    lora_lrs = [lr_lora] if isinstance(lr_lora, float) else list(lr_lora)
    lrs = ([lr_fft] if train_base else []) + lora_lrs
    wds = ([wd_fft] if train_base else []) + [wd_lora] * len(ranks)
    oracle = Oracle(net, ranks, alphas, train_base, lrs, wds, 5e-3, 0.05, score, k)
    net.to(device)
    opt = molf.MoLFAdamW(
        net,
        lr_fft=lr_fft,
        lr_lora=lr_lora,
        weight_decay_fft=wd_fft,
        weight_decay_lora=wd_lora,
        lr_other=5e-3,
        weight_decay_other=0.05,
        score=score,
        top_k=k,
        log_routing=log,
    )

    def factor(step):  # warmup then decay
        return min(1.0, (step + 1) / 3) * (1.0 - step / 20)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(3)
    for step in range(8):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        y = torch.randn(16, 3, generator=g, dtype=torch.float64)
        oracle.step(x, y, factor(step))
        opt.zero_grad()
        x, y = x.to(device), y.to(device)
        ((net(x) - y) ** 2).mean().backward()
        with during_step() if during_step is not None else contextlib.nullcontext():
            opt.step()
        sched.step()

    names = {"fc1": net.fc1, "fc2": net.fc2}
    for name, m in names.items():
        d = oracle.mods[name]
        pairs = [(m.base_layer.weight, d["W"]), (m.base_layer.bias, d["b"])]
        pairs += list(zip(m.lora_A, d["A"])) + list(zip(m.lora_B, d["B"]))
        for p, q in pairs:
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=1e-10)
            if p.requires_grad:
                st = opt.state[p]
                torch.testing.assert_close(
                    st["exp_avg"].cpu(), oracle.state[id(q)]["m"], rtol=0, atol=1e-10
                )
                torch.testing.assert_close(
                    st["exp_avg_sq"].cpu(), oracle.state[id(q)]["v"], rtol=0, atol=1e-10
                )
    others = [
        (net.norm.weight, "ln_w"),
        (net.norm.bias, "ln_b"),
        (net.head.weight, "head_w"),
        (net.head.bias, "head_b"),
    ]
    for p, key in others:
        torch.testing.assert_close(p.detach().cpu(), oracle.other[key].detach(), rtol=0, atol=1e-10)

    if not log:
        return opt
    # The routing decisions agree step by step, and the case really routes.
    mods = opt.routing_log.module_names
    for rec, dec in zip(opt.routing_log.records, oracle.decisions, strict=True):
        for mi, name in enumerate(mods):
            assert rec["winners"][mi].nonzero().flatten().tolist() == dec[name]
    all_winners = {tuple(w) for dec in oracle.decisions for w in dec.values()}
    if k < cfg.n_experts:
        assert len(all_winners) > 1, f"the oracle case never switched experts: {all_winners}"
    return opt
