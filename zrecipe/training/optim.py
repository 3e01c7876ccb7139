"""Optimisers by name (one table), and the state's (de)serialisation and rule check.

Each optimiser follows a PyTorch reference step for step (tests/test_optimizers.py), so hyper-parameters
brought from a PyTorch trainer (ai-toolkit, musubi-tuner, OneTrainer, kohya) mean the same here:

| recipe name | update | reference |
|---|---|---|
| AdamW | `PyTorchAdamW` (bias-corrected; MLX's own defaults to uncorrected, 3-6x larger first steps) | `torch.optim.AdamW` |
| AdamW8bit | `adamw8bit.AdamW8bit`: block-quantised 8-bit moments | `bitsandbytes.optim.AdamW8bit` |
| Lion | MLX's `Lion` | `lion_pytorch.Lion` |
| SGD | MLX's `SGD` (momentum, Nesterov, L2 weight decay) | `torch.optim.SGD` |
| Adafactor | MLX's `Adafactor` | `transformers.optimization.Adafactor` |
| Prodigy | `prodigy.Prodigy` | `prodigyopt.Prodigy` |

The learning-rate schedule (schedules.py) is a pure function of the optimiser's own `step` counter, which
lives in the optimiser state: restoring the flattened state from a checkpoint restores the learning rate
exactly. Every optimiser has a `rule` written into optimizer.safetensors; a checkpoint whose state follows
another rule (another optimiser, or the uncorrected AdamW of older zrecipe versions) is refused instead of
continued.

A new optimiser is one entry in OPTIMIZERS (a build function, a rule name, its state bytes per tensor)
plus its name and hyper-parameters in the recipe schema (`recipe.schema.OPTIMIZERS`, `OPTIMIZER_KEYS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError, RecipeError
from zrecipe.training.adamw8bit import AdamW8bit
from zrecipe.training.adamw8bit import state_bytes as adamw8bit_state_bytes
from zrecipe.training.prodigy import Prodigy
from zrecipe.training.schedules import Schedule, learning_rate_schedule

STATE_FORMAT = "zrecipe-optimizer"


class PyTorchAdamW(optim.AdamW):
    """AdamW computed as `torch.optim.AdamW` computes it, operation for operation:

        p ← p·(1 − lr·λ);  m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²
        p ← p − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)

    The bias corrections 1 − β^t are computed as −expm1(t·ln β): in float32 `1 − 0.999**t` loses five
    digits at small t, which PyTorch (in float64) does not. The moments m, v and the step t are the same
    quantities PyTorch keeps (`exp_avg`, `exp_avg_sq`, `step`)."""

    def __init__(self, learning_rate: Schedule, betas: list[float], eps: float, weight_decay: float):
        super().__init__(learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=True)
        self._log_betas = [math.log(b) for b in betas]  # in float64, like PyTorch's β**t

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        dtype = gradient.dtype
        lr = self.learning_rate.astype(mx.float32)
        b1, b2 = self.betas
        log_b1, log_b2 = self._log_betas
        t = self.step.astype(mx.float32)
        parameter = parameter * (1 - lr * self.weight_decay).astype(dtype)
        m = state["m"] + (1 - b1) * (gradient - state["m"])
        v = state["v"] * b2 + (1 - b2) * gradient * gradient
        state["m"], state["v"] = m, v
        step_size = (lr / -mx.expm1(t * log_b1)).astype(dtype)
        correction2 = mx.sqrt(-mx.expm1(t * log_b2)).astype(dtype)
        return parameter - step_size * m / (mx.sqrt(v) / correction2 + self.eps)


def _adamw(spec: Any, learning_rate: Schedule) -> optim.Optimizer:
    return PyTorchAdamW(
        learning_rate,
        betas=[float(b) for b in spec.betas],
        eps=float(spec.eps),
        weight_decay=float(spec.weight_decay),
    )


def _adamw8bit(spec: Any, learning_rate: Schedule) -> optim.Optimizer:
    return AdamW8bit(
        learning_rate, [float(b) for b in spec.betas], spec.eps, spec.weight_decay, spec.min_8bit_size
    )


def _lion(spec: Any, learning_rate: Schedule) -> optim.Optimizer:
    # MLX's Lion is lion-pytorch's update (weight decay p·(1 − lr·λ), not divided by the initial lr).
    return optim.Lion(
        learning_rate, betas=[float(b) for b in spec.betas], weight_decay=float(spec.weight_decay)
    )


def _sgd(spec: Any, learning_rate: Schedule) -> optim.Optimizer:
    # MLX's SGD is torch.optim.SGD without dampening (its first momentum buffer is the gradient itself).
    return optim.SGD(
        learning_rate,
        momentum=float(spec.momentum),
        weight_decay=float(spec.weight_decay),
        nesterov=bool(spec.nesterov),
    )


def _adafactor(spec: Any, learning_rate: Schedule) -> optim.Optimizer:
    if spec.relative_step:
        # The step size Adafactor computes itself, min(1e-2 (or 1e-6·t with warmup_init), 1/√t), given as
        # the schedule so that the loop reports it; MLX's Adafactor ignores it in the update.
        def relative(step: mx.array) -> mx.array:
            t = step.astype(mx.float32) + 1
            return mx.minimum(1e-6 * t if spec.warmup_init else 1e-2, mx.rsqrt(t))

        learning_rate = relative
    # MLX's Adafactor is transformers' `Adafactor` (the same factored second moment, RMS clipping,
    # parameter scale and relative step).
    return optim.Adafactor(
        learning_rate,
        eps=(float(spec.eps), float(spec.eps_scale)),
        clip_threshold=float(spec.clip_threshold),
        decay_rate=float(spec.decay_rate),
        beta_1=None if spec.beta1 is None else float(spec.beta1),
        weight_decay=float(spec.weight_decay),
        scale_parameter=bool(spec.scale_parameter),
        relative_step=bool(spec.relative_step),
        warmup_init=bool(spec.warmup_init),
    )


def _prodigy(spec: Any, learning_rate: Schedule) -> optim.Optimizer:
    return Prodigy(
        learning_rate,
        betas=[float(b) for b in spec.betas],
        beta3=spec.beta3,
        eps=float(spec.eps),
        weight_decay=float(spec.weight_decay),
        d0=float(spec.d0),
        d_coef=float(spec.d_coef),
        growth_rate=spec.growth_rate,
        use_bias_correction=bool(spec.use_bias_correction),
        safeguard_warmup=bool(spec.safeguard_warmup),
    )


# State bytes of one trainable tensor: (recipe optimizer spec, tensor shape, parameter dtype's itemsize).
StateBytes = Callable[[Any, tuple[int, ...], int], int]


def _moments(count: int) -> StateBytes:
    """`count` tensors the shape and dtype of the parameter (AdamW: m, v; Lion and SGD: one)."""
    return lambda spec, shape, itemsize: count * math.prod(shape) * itemsize


def _adafactor_bytes(spec: Any, shape: tuple[int, ...], itemsize: int) -> int:
    size = math.prod(shape)
    if len(shape) >= 2:  # factored: one row and one column statistic per matrix
        second = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    else:
        second = size
    return (second + (size if spec.beta1 is not None else 0)) * itemsize


def _prodigy_bytes(spec: Any, shape: tuple[int, ...], itemsize: int) -> int:
    # s, p0, exp_avg (β1 > 0), exp_avg_sq; p0 of an all-zero tensor (LoRA B) is one element (at most this)
    tensors = 4 if spec.betas[0] > 0 else 3
    return tensors * math.prod(shape) * itemsize


def _adamw8bit_bytes(spec: Any, shape: tuple[int, ...], itemsize: int) -> int:
    return adamw8bit_state_bytes(math.prod(shape), int(spec.min_8bit_size))


@dataclass(frozen=True)
class OptimizerKind:
    """One optimiser: how to build it from the recipe's `optimizer:` block and a schedule, the name of its
    update rule (recorded with its state; change it whenever the update changes, so that no checkpoint
    continues under a rule it was not trained with), and `state_bytes(spec, shape, itemsize)`: the bytes
    of optimiser state it keeps for one trainable tensor (what the memory model counts)."""

    build: Callable[[Any, Schedule], optim.Optimizer]
    rule: str
    state_bytes: StateBytes


# Keyed by the lower-cased recipe name (`optimizer.name`); the recipe's names are recipe.schema.OPTIMIZERS.
OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind(_adamw, rule="adamw-pytorch", state_bytes=_moments(2)),
    "adamw8bit": OptimizerKind(
        _adamw8bit, rule="adamw8bit-bnb-dynamic-block256", state_bytes=_adamw8bit_bytes
    ),
    "lion": OptimizerKind(_lion, rule="lion-pytorch", state_bytes=_moments(1)),
    "sgd": OptimizerKind(_sgd, rule="sgd-pytorch", state_bytes=_moments(1)),
    "adafactor": OptimizerKind(_adafactor, rule="adafactor-transformers", state_bytes=_adafactor_bytes),
    "prodigy": OptimizerKind(_prodigy, rule="prodigy-prodigyopt-1.1", state_bytes=_prodigy_bytes),
}


def optimizer_kind(spec: Any) -> OptimizerKind:
    """The table entry for a `zrecipe.recipe.Optimizer`; RecipeError for an unknown name."""
    kind = OPTIMIZERS.get(str(spec.name).lower())
    if kind is None:
        names = ", ".join(sorted(OPTIMIZERS))
        raise RecipeError(f"optimizer.name: {spec.name!r} is not supported; use one of: {names}.")
    return kind


def make_optimizer(spec: Any, total_steps: int) -> optim.Optimizer:
    """The optimiser a `zrecipe.recipe.Optimizer` describes (its name, hyper-parameters and learning-rate
    schedule), for a run of `total_steps` optimiser steps."""
    schedule = learning_rate_schedule(
        float(spec.learning_rate),
        total_steps,
        spec.warmup_steps,
        spec.schedule,
        float(spec.min_learning_rate),
        int(spec.num_cycles),
    )
    return optimizer_kind(spec).build(spec, schedule)


def optimizer_state_bytes(spec: Any, shapes: Any, itemsize: int) -> int:
    """Bytes of optimiser state for trainable tensors of `shapes` whose dtype has `itemsize` bytes."""
    kind = optimizer_kind(spec)
    return sum(kind.state_bytes(spec, tuple(shape), itemsize) for shape in shapes)


def state_metadata(spec: Any) -> dict[str, str]:
    """The safetensors metadata of optimizer.safetensors: the format and the update rule of the state."""
    return {"format": STATE_FORMAT, "rule": optimizer_kind(spec).rule}


def flatten_state(optimizer: optim.Optimizer) -> dict[str, mx.array]:
    """The optimiser state as a flat {key: array} dict for optimizer.safetensors."""
    flat = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    return flat


def check_rule(metadata: dict[str, str], spec: Any, where: str) -> None:
    """Refuse optimiser state written under another update rule than the recipe's optimiser uses."""
    rule, saved = optimizer_kind(spec).rule, metadata.get("rule")
    if saved == rule:
        return
    if saved is None and rule == "adamw-pytorch":
        raise CheckpointError(
            f"{where}: the optimiser state comes from an older zrecipe whose AdamW did not correct its "
            "moments' bias (steps 3-6x larger early on); the current AdamW follows PyTorch, so this run "
            "cannot continue exactly. Start the training again (drop --train-checkpoint), or finish it "
            "with the zrecipe version that wrote the checkpoint."
        )
    raise CheckpointError(
        f"{where}: the optimiser state follows update rule {saved!r}, but this recipe's optimizer "
        f"{spec.name} uses {rule!r}; resume with the optimizer the checkpoint was trained with."
    )


def restore_state(optimizer: optim.Optimizer, flat: dict[str, mx.array], where: str) -> None:
    """Put a flattened state back; every key and shape must match the freshly initialised optimiser."""
    current = flatten_state(optimizer)
    missing = sorted(set(current) - set(flat))
    unexpected = sorted(set(flat) - set(current))
    misshaped = sorted(k for k in set(current) & set(flat) if current[k].shape != flat[k].shape)
    if missing or unexpected or misshaped:
        detail = "; ".join(
            f"{title}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if items
        )
        raise CheckpointError(f"{where}: optimizer state does not match this model/recipe ({detail}).")
    # Set leaves in place: the state tree keeps empty sub-trees for frozen modules that a flat dict loses,
    # and `optimizer.update` walks the state alongside the gradient tree.
    for key in current:
        node: Any = optimizer.state
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        value = flat[key].astype(current[key].dtype)
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
