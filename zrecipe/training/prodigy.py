"""Prodigy (Mishchenko & Defazio, arXiv:2306.06101): Adam whose step size d is estimated from the run.

Follows the `prodigyopt` package (`prodigyopt.Prodigy`, v1.1) step for step, with decoupled (AdamW-style)
weight decay and every parameter in one group. Unlike the other optimisers the update is not per
parameter: d is estimated from sums over *all* parameters (a dot product of each gradient with its
distance from the initial weights, and the L1 norm of a running sum of gradients), so `apply_gradients`
makes two passes over the tree. d, d_max, the running numerator and the count of updates taken live in
the state (`prodigy.*`), so a checkpoint resumes the estimate exactly.

`learning_rate` scales d (prodigyopt's `lr`, 1.0 unless the run is unstable); a schedule multiplies it.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map


class Prodigy(optim.Optimizer):
    """Prodigy with prodigyopt's hyper-parameters: betas, beta3 (None: √β2), eps, weight_decay (decoupled),
    d0, d_coef, growth_rate (None: unbounded), use_bias_correction, safeguard_warmup."""

    def __init__(
        self,
        learning_rate,
        betas: list[float],
        beta3: float | None,
        eps: float,
        weight_decay: float,
        d0: float,
        d_coef: float,
        growth_rate: float | None,
        use_bias_correction: bool,
        safeguard_warmup: bool,
    ):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.betas = [float(b) for b in betas]
        self.beta3 = math.sqrt(self.betas[1]) if beta3 is None else float(beta3)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.d0, self.d_coef = float(d0), float(d_coef)
        self.growth_rate = math.inf if growth_rate is None else float(growth_rate)
        self.use_bias_correction, self.safeguard_warmup = bool(use_bias_correction), bool(safeguard_warmup)
        self.state["prodigy"] = {
            "d": mx.array(self.d0, dtype=mx.float32),
            "d_max": mx.array(self.d0, dtype=mx.float32),
            "d_numerator": mx.array(0.0, dtype=mx.float32),
            "k": mx.array(0.0, dtype=mx.float32),  # updates taken (a step with lr 0 takes none)
        }

    def init_single(self, parameter: mx.array, state: dict) -> None:
        state["s"] = mx.zeros_like(parameter)
        # prodigyopt keeps a 0-d zero instead of a copy of an all-zero tensor (LoRA's B): same numbers.
        state["p0"] = parameter if mx.any(parameter).item() else mx.zeros((), dtype=parameter.dtype)
        if self.betas[0] > 0:
            state["exp_avg"] = mx.zeros_like(parameter)
        state["exp_avg_sq"] = mx.zeros_like(parameter)

    def apply_gradients(self, gradients: dict, parameters: dict):
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1

        est = self.state["prodigy"]
        b1, b2 = self.betas
        lr = self.learning_rate.astype(mx.float32)
        d, d_max = est["d"], est["d_max"]
        bias = 1.0
        if self.use_bias_correction:  # √(1 − β2^(k+1)) / (1 − β1^(k+1)), as −expm1 against cancellation
            k1 = est["k"] + 1
            bias = mx.sqrt(-mx.expm1(k1 * math.log(b2))) / (-mx.expm1(k1 * math.log(b1)) if b1 > 0 else 1.0)
        dlr = d * lr * bias
        ratio = d / self.d0

        # Pass 1: moments and the running sum s, and the two global sums d is estimated from.
        items: list[tuple[mx.array, mx.array, dict]] = []
        tree_map(lambda g, p, s: items.append((g, p, s)), gradients, parameters, self.state)
        updated, numerator, denominator = [], mx.array(0.0), mx.array(0.0)
        for g, p, state in items:
            dt = g.dtype
            numerator = numerator + mx.sum(g * (state["p0"] - p)).astype(mx.float32)
            new = {}
            if b1 > 0:
                new["exp_avg"] = state["exp_avg"] * b1 + (d * (1 - b1)).astype(dt) * g
            new["exp_avg_sq"] = state["exp_avg_sq"] * b2 + (d * d * (1 - b2)).astype(dt) * (g * g)
            s_scale = ratio * (d if self.safeguard_warmup else dlr)
            new["s"] = state["s"] * self.beta3 + s_scale.astype(dt) * g
            denominator = denominator + mx.sum(mx.abs(new["s"])).astype(mx.float32)
            updated.append(new)
        # prodigyopt skips the step entirely when lr is 0 or no gradient has arrived yet.
        take = (lr > 0) & (denominator > 0)
        d_numerator = est["d_numerator"] * self.beta3 + ratio * dlr * numerator
        d_hat = self.d_coef * d_numerator / mx.where(take, denominator, 1.0)
        new_d_max = mx.maximum(d_max, d_hat)
        new_d = mx.where(d == self.d0, mx.maximum(d, d_hat), d)  # the first estimate may only grow
        # min(d_max, d·growth); with unbounded growth that is d_max (and no 0·∞ to guard against)
        new_d = new_d_max if math.isinf(self.growth_rate) else mx.minimum(new_d_max, new_d * self.growth_rate)
        self.state["prodigy"] = {
            "d": mx.where(take, new_d, d),
            "d_max": mx.where(take, new_d_max, d_max),
            "d_numerator": mx.where(take, d_numerator, est["d_numerator"]),
            "k": mx.where(take, est["k"] + 1, est["k"]),
        }

        # Pass 2: the parameter update with the new d (and the old d in dlr).
        out = []
        for (g, p, state), new in zip(items, updated, strict=True):
            dt = p.dtype
            denom = mx.sqrt(new["exp_avg_sq"]) + (new_d * self.eps).astype(dt)
            step = p
            if self.weight_decay != 0:
                step = step + (-self.weight_decay * dlr).astype(dt) * step
            if b1 > 0:
                step = step + (-dlr).astype(dt) * (new["exp_avg"] / denom)
            else:
                step = step + (-dlr * new_d).astype(dt) * (g / denom)
            for name, value in new.items():
                state[name] = mx.where(take, value, state[name])
            out.append(mx.where(take, step, p))
        leaves = iter(out)
        return tree_map(lambda _: next(leaves), gradients)  # the same walk as pass 1
