"""DoRA, LoKr and LoHa layers checked against their reference implementations (fp32, CPU), and the
properties every kind keeps: step 0 is the base model exactly, fuse == unfused, file round trips, dropout.

References: DoRA against peft's `LoraConfig(use_dora=True)` on a torch Linear with the same weights
(forward and the gradients of A, B and the magnitude); LoKr and LoHa against the `lycoris-lora` package's
`LokrModule` / `LohaModule` (its default, non-bypass forward) with the same factors — the factor shapes
(`factor`, `decompose_both`, `full_matrix`) and the scale are LyCORIS' own choice, compared too.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")

from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from zrecipe.export.lora_formats import export_tensors, lora_from_tensors
from zrecipe.lora.layers import TRAINABLE_KINDS, adapter_dropout
from zrecipe.lora.variant_layers import DoRALinear, LoHaLinear, LoKrLinear
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer, quantize_transformer
from zrecipe.recipe import LoraTarget
from zrecipe.recipe.schema import BLOCK_LAYER_TYPES
from zrecipe.training.lora import apply_lora, lora_modules

pytestmark = pytest.mark.parity
TOLERANCE = 1e-4


def _torch_linear(weight: np.ndarray, bias: np.ndarray | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data = torch.tensor(weight)
    if bias is not None:
        lin.bias.data = torch.tensor(bias)
    return lin


def _mlx_linear(weight: np.ndarray, bias: np.ndarray | None, bits: int | None = None) -> nn.Module:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = mx.array(weight)
    if bias is not None:
        lin.bias = mx.array(bias)
    return nn.QuantizedLinear.from_linear(lin, 64, bits) if bits else lin


def _dense(layer: nn.Module) -> np.ndarray:
    if isinstance(layer, nn.QuantizedLinear):
        return np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits))
    return np.array(layer.weight)


def _grads(layer, x: np.ndarray, probe: np.ndarray):
    layer.freeze()
    layer.unfreeze(keys=list(layer.TRAINABLE), recurse=False)

    def loss(model, x):
        return (model(x) * mx.array(probe)).sum()

    value_grad = nn.value_and_grad(layer, loss)
    _, grads = value_grad(layer, mx.array(x))
    return grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bits", [None, 8])
def test_dora_matches_peft_forward_and_gradients(bias, bits):
    rng = np.random.default_rng(1)
    out_d, in_d, r, alpha = 96, 64, 4, 8.0
    weight = rng.standard_normal((out_d, in_d)).astype(np.float32) * 0.1
    b = rng.standard_normal(out_d).astype(np.float32) if bias else None
    base = _mlx_linear(weight, b, bits)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _torch_linear(_dense(base), b)  # peft on the very weights ours computes with

    net = peft.get_peft_model(
        Net(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=True)
    )
    ref = net.base_model.model.proj
    ours = DoRALinear.from_base(base, r, alpha)
    init = ref.lora_magnitude_vector["default"].weight.detach().numpy()
    assert np.abs(np.array(ours.magnitude) - init).max() <= 1e-5  # both start at ‖W‖ per row

    a = rng.standard_normal((r, in_d)).astype(np.float32) * 0.2
    up = rng.standard_normal((out_d, r)).astype(np.float32) * 0.2
    magnitude = init * (1 + 0.2 * rng.standard_normal(out_d).astype(np.float32))
    ref.lora_A["default"].weight.data = torch.tensor(a)
    ref.lora_B["default"].weight.data = torch.tensor(up)
    ref.lora_magnitude_vector["default"].weight.data = torch.tensor(magnitude)
    ours.lora_a, ours.lora_b, ours.magnitude = mx.array(a.T), mx.array(up.T), mx.array(magnitude)

    x = rng.standard_normal((3, 5, in_d)).astype(np.float32)
    probe = rng.standard_normal((3, 5, out_d)).astype(np.float32)
    y = ref(torch.tensor(x))
    (y * torch.tensor(probe)).sum().backward()
    assert np.abs(np.array(ours(mx.array(x))) - y.detach().numpy()).max() <= TOLERANCE
    grads = _grads(ours, x, probe)
    for name, ref_grad in (
        ("lora_a", ref.lora_A["default"].weight.grad.numpy().T),
        ("lora_b", ref.lora_B["default"].weight.grad.numpy().T),
        ("magnitude", ref.lora_magnitude_vector["default"].weight.grad.numpy()),
    ):
        assert np.abs(np.array(grads[name]) - ref_grad).max() <= TOLERANCE, name


# (out, in, rank, alpha, factor, decompose_both, full_matrix): every factor layout LyCORIS picks.
LOKR_CASES = [
    (170, 64, 4, 8.0, -1, False, False),  # W1 full, W2 a pair
    (64, 64, 2, 3.0, -1, True, False),  # both pairs
    (256, 64, 16, 4.0, 4, False, False),  # factor 4
    (170, 64, 4, 2.0, 8, False, True),  # full_matrix: both full, scale 1
    (64, 64, 8, 8.0, -1, False, False),  # rank too large for a pair: W2 full
    (64, 170, 3, 1.0, 16, True, False),
]


def _copy_factors(ref, ours, names, rng) -> None:
    for name in names:
        value = rng.standard_normal(tuple(getattr(ref, name).shape)).astype(np.float32) * 0.3
        getattr(ref, name).data = torch.tensor(value)
        assert tuple(ours[name].shape) == value.shape, name
        ours[name] = mx.array(value)


@pytest.mark.parametrize("case", LOKR_CASES)
@pytest.mark.parametrize("bits", [None, 8])
def test_lokr_matches_lycoris_forward(case, bits):
    out_d, in_d, r, alpha, factor, both, full = case
    if bits and in_d % 64:
        pytest.skip("not quantisable with group size 64")
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((out_d, in_d)).astype(np.float32) * 0.1
    base = _mlx_linear(weight, None, bits)
    ref = LokrModule("m", _torch_linear(_dense(base), None), 1.0, r, alpha, factor=factor, decompose_both=both,
                     full_matrix=full)  # fmt: skip
    ref.apply_to()
    ours = LoKrLinear.from_base(base, r, alpha, factor=factor, decompose_both=both, full_matrix=full)
    names = [n for n in LoKrLinear._FACTORS if isinstance(getattr(ref, n, None), torch.nn.Parameter)]
    assert sorted(names) == sorted(ours.TRAINABLE) and ref.scale == ours.scale
    _copy_factors(ref, ours, names, rng)
    x = rng.standard_normal((3, 5, in_d)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    assert np.abs(np.array(ours(mx.array(x))) - want).max() <= TOLERANCE


@pytest.mark.parametrize("case", [(170, 64, 4, 8.0), (64, 64, 8, 3.0), (96, 64, 2, 1.0)])
@pytest.mark.parametrize("bits", [None, 8])
def test_loha_matches_lycoris_forward(case, bits):
    out_d, in_d, r, alpha = case
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((out_d, in_d)).astype(np.float32) * 0.1
    bias = rng.standard_normal(out_d).astype(np.float32)
    base = _mlx_linear(weight, bias, bits)
    ref = LohaModule("m", _torch_linear(_dense(base), bias), 1.0, r, alpha)
    ref.apply_to()
    ours = LoHaLinear.from_base(base, r, alpha)
    _copy_factors(ref, ours, LoHaLinear.TRAINABLE, rng)
    x = rng.standard_normal((3, 5, in_d)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    assert np.abs(np.array(ours(mx.array(x))) - want).max() <= TOLERANCE


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("kinds") / "tiny")


def _every_target(kind: str, **options) -> list[LoraTarget]:
    """Every layer type of every block group: all the targets the plain LoRA supports."""
    return [
        LoraTarget(group, 0, None, BLOCK_LAYER_TYPES[group], rank=2, alpha=3.0, kind=kind, **options)
        for group in BLOCK_LAYER_TYPES
    ]


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    c = model.config
    x = mx.array(rng.standard_normal((2, c.in_channels, 8, 8)).astype(np.float32))
    caps = [mx.array(rng.standard_normal((n, c.cap_feat_dim)).astype(np.float32)) for n in (5, 9)]
    return x, mx.array([0.3, 0.8]), caps


def _perturb(model, rng) -> None:
    """Random values in every trainable parameter (the update is no longer zero)."""
    for layer in lora_modules(model).values():
        for name in layer.TRAINABLE:
            value = layer[name]
            noise = rng.standard_normal(value.shape).astype(np.float32) * 0.2
            layer[name] = value * (1 + 0.1 * mx.array(noise)) if name == "magnitude" else mx.array(noise)


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
@pytest.mark.parametrize("bits", [None, 8])
def test_every_target_step_zero_is_the_base_and_fuse_is_exact(tiny_path, kind, bits):
    base_model = load_transformer(tiny_path, dtype="float32", quantize=bits)
    model = load_transformer(tiny_path, dtype="float32", quantize=bits)
    paths = apply_lora(model, _every_target(kind))
    n_linear = sum(len(BLOCK_LAYER_TYPES[g]) * len(getattr(model, g)) for g in BLOCK_LAYER_TYPES)
    assert len(paths) == n_linear and all(
        isinstance(m, TRAINABLE_KINDS[kind]) for m in lora_modules(model).values()
    )
    if bits:
        assert any(isinstance(m.base_layer(), nn.QuantizedLinear) for m in lora_modules(model).values())
    inputs = _inputs(model)
    assert mx.array_equal(model(*inputs), base_model(*inputs))  # step 0: exactly the base model

    _perturb(model, np.random.default_rng(4))
    unfused = np.array(model(*inputs))
    assert not np.allclose(unfused, np.array(base_model(*inputs)), atol=1e-3)
    for path, layer in lora_modules(model).items():
        fused = layer.fuse()
        x = mx.random.normal((3, fused.weight.shape[1]), key=mx.random.key(len(path)))
        assert np.abs(np.array(fused(x)) - np.array(layer(x))).max() <= 1e-4, path


@pytest.mark.parametrize(
    "kind, options",
    [("lora", {}), ("dora", {}), ("lokr", {}), ("lokr", {"decompose_both": True}), ("lokr", {"full_matrix": True}),
     ("loha", {})],
)  # fmt: skip
def test_file_round_trip_rebuilds_each_layer_exactly(tiny_path, kind, options):
    model = load_transformer(tiny_path, dtype="float32")
    apply_lora(model, [LoraTarget("layers", 0, 1, ("attention.to_q", "feed_forward.w1"), rank=2, alpha=3.0,
                                  kind=kind, **options)])  # fmt: skip
    _perturb(model, np.random.default_rng(5))
    layers = lora_modules(model)
    deltas = {p: m.to_delta() for p, m in layers.items()}
    read = lora_from_tensors(export_tensors(deltas, "zrecipe", "float32"), {}).deltas
    for path, layer in layers.items():
        assert read[path].KIND == kind
        rebuilt = type(layer).from_delta(layer.base_layer(), read[path])
        for name in layer.TRAINABLE:
            assert mx.array_equal(rebuilt[name], layer[name]), (path, name)
        x = mx.random.normal((2, 64))
        assert mx.array_equal(rebuilt(x), layer(x))


def test_dropout_only_in_training_inside_the_step_key_and_inverted():
    base = nn.Linear(16, 16, bias=False)
    base.weight = mx.zeros((16, 16))
    layer = TRAINABLE_KINDS["lora"].from_base(base, rank=16, alpha=16.0, dropout=0.25)
    layer.lora_a, layer.lora_b = mx.eye(16), mx.eye(16)  # the adapter path is the identity
    x = mx.random.normal((64, 16), key=mx.random.key(0)) + 3.0
    assert mx.array_equal(layer(x), x)  # outside a train step: no dropout
    with adapter_dropout(mx.random.key(7)):
        once, again = layer(x), layer(x)
        layer.eval()
        assert mx.array_equal(layer(x), x)  # eval mode: no dropout
        layer.train()
    with adapter_dropout(mx.random.key(8)):
        other = layer(x)
    assert mx.array_equal(once, again) and not mx.array_equal(once, other)
    kept = np.array(once) != 0
    assert 0.65 < kept.mean() < 0.85  # p = 0.25 of the inputs dropped
    np.testing.assert_allclose(np.array(once)[kept], np.array(x / 0.75)[kept], rtol=1e-6)
    layer.dropout_index = 1  # another layer draws another mask from the same key
    with adapter_dropout(mx.random.key(7)):
        assert not mx.array_equal(layer(x), once)


def test_quantised_transformer_targets_of_every_kind_train(tiny_path):
    """One gradient step through a quantised base for every kind: gradients reach each kind's parameters."""
    model = load_transformer(tiny_path, dtype="float32")
    quantize_transformer(model, 8)
    targets = [
        LoraTarget("layers", 0, 1, ("attention.to_q",), rank=2, alpha=2.0, kind="dora"),
        LoraTarget("layers", 0, 1, ("attention.to_k",), rank=2, alpha=2.0, kind="lokr", factor=4),
        LoraTarget("layers", 0, 1, ("attention.to_v",), rank=2, alpha=2.0, kind="loha"),
        LoraTarget("layers", 0, 1, ("attention.to_out.0",), rank=2, alpha=2.0, dropout=0.5),
    ]
    apply_lora(model, targets)
    x, t, caps = _inputs(model)

    def loss(m):
        return mx.mean(m(x, t, caps) ** 2)

    _, grads = nn.value_and_grad(model, loss)(model)
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(grads))
    for part in ("to_q.lora_b", "to_q.magnitude", "to_k.lokr_w2_b", "to_v.hada_w2_a", "to_out.0.lora_b"):
        key = f"layers.0.attention.{part}"
        assert key in flat and float(mx.abs(flat[key]).max()) > 0, key
