"""DoRA, LoKr and LoHa exports applied the way each client applies them, and LyCORIS files from other tools.

- diffusers (the real loader, fp32 CPU): `load_lora_adapter` / `load_lora_weights` of the `diffusers`
  export; diffusers 0.42's Z-Image loader takes LoRA (with `lora_magnitude_vector` → PEFT DoRA) and LoKr
  (`lokr_*`, via PEFT's LoKr; `_convert_non_diffusers_lokr_to_diffusers` for the `comfyui` file), so
  LoHa is written as its exact rank-r² LoRA there.
- ComfyUI, re-stated from its source as tests/test_lora_clients.py does (no package ships `comfy/`):
  `comfy/weight_adapter/lokr.py` (ΔW = kron(w1, w2), each rebuilt from `_a @ _b` when split, times
  alpha / dim with dim the split factor's rank, W2's first; no split → 1), `loha.py` (ΔW = (w1_a w1_b) ⊙
  (w2_a w2_b) · alpha / w1_b rows), and `base.py` `weight_decompose` for `dora_scale`: the merged weight
  times dora_scale / ‖merged‖ per output row when dora_scale has a row per output (per input column when
  it is (1, in)), plus its dtype's eps. ComfyUI master still divides the per-row case by the *base*
  weight's norm (PR Comfy-Org/ComfyUI#15458 fixes that, matching LyCORIS and PEFT); the re-statement
  follows the fixed rule, which is what the DoRA these files hold means.
- LyCORIS: files written by `lycoris-lora`'s own `LycorisNetwork.save_weights` on diffusers' Z-Image
  model (`lycoris_<path>` keys) are read by zrecipe and give LyCORIS' own output.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("lycoris")

from mlx.utils import tree_flatten
from test_lora_clients import _comfy_key_map, _comfy_state

from zrecipe.errors import UserError
from zrecipe.export.apply import apply_loras, linear_shapes
from zrecipe.export.lora_formats import read_lora, write_lora
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.recipe import LoraTarget
from zrecipe.training.lora import apply_lora, lora_modules, save_adapter

pytestmark = pytest.mark.parity
TOLERANCE = 1e-4
ALL = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
       "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")  # fmt: skip
KINDS = {"dora": {}, "lokr": {"factor": 4}, "loha": {}}


def _targets(kind: str, **options) -> list[LoraTarget]:
    return [
        LoraTarget("layers", 0, None, ALL, rank=2, alpha=3.0, kind=kind, **options),
        LoraTarget("noise_refiner", 0, 1, ("attention.to_v", "feed_forward.w2"), rank=3, alpha=1.5, kind=kind,
                   **options),
        LoraTarget("context_refiner", 0, 1, ("attention.to_k",), rank=2, alpha=2.0, kind=kind, **options),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("kind_clients") / "tiny", seed=8)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """{kind: adapter file} with every trainable parameter randomised (a visible, non-zero update)."""
    root = tmp_path_factory.mktemp("kind_adapters")
    out = {}
    rng = np.random.default_rng(9)
    for kind, options in KINDS.items():
        model = load_transformer(tiny, dtype="float32")
        apply_lora(model, _targets(kind, **options))
        for layer in lora_modules(model).values():
            for name in layer.TRAINABLE:
                noise = mx.array(rng.standard_normal(layer[name].shape).astype(np.float32))
                layer[name] = layer[name] * (1 + 0.2 * noise) if name == "magnitude" else 0.3 * noise
        out[kind] = save_adapter(model, root / f"{kind}.safetensors", {"base_model": "tiny"})
    return out


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 6, 8, generator=gen)
    caps = [torch.randn(n, 64, generator=gen) for n in (5, 37)]
    return x, torch.tensor([0.3, 0.8]), caps


def _reference_out(model, x, t, caps):
    with torch.no_grad():
        out = model([xi[:, None] for xi in x], t, caps, return_dict=False)[0]
    return torch.stack([o[:, 0] for o in out]).numpy()


def _ours_out(tiny, x, t, caps, loras=()):
    model = load_transformer(tiny, dtype="float32")
    if loras:
        apply_loras(model, [read_lora(p, linear_shapes(model)) for p in loras])
    return np.array(model(mx.array(x.numpy()), mx.array(t.numpy()), [mx.array(c.numpy()) for c in caps]))


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind, fmt", [("dora", "diffusers"), ("lokr", "diffusers"), ("lokr", "comfyui"),
                                       ("loha", "diffusers")])  # fmt: skip
def test_diffusers_loads_each_kind_and_matches_zrecipe(tiny, adapters, tmp_path, kind, fmt):
    exported = write_lora(read_lora(adapters[kind]), tmp_path / f"{kind}_{fmt}.safetensors", fmt, "float32")
    x, t, caps = _inputs()
    reference = diffusers.ZImageTransformer2DModel.from_pretrained(tiny / "transformer").eval()
    base_out = _reference_out(reference, x, t, caps)
    pipe = diffusers.ZImagePipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=reference
    )
    pipe.load_lora_weights(str(exported), adapter_name="zr")
    lora_out = _reference_out(reference, x, t, caps)
    ours = _ours_out(tiny, x, t, caps, [adapters[kind]])
    assert _rel(lora_out, base_out) > 1e-2  # the adapter really changes the output
    assert _rel(ours, lora_out) <= TOLERANCE


def test_diffusers_export_refuses_what_diffusers_cannot_load(tiny, tmp_path):
    model = load_transformer(tiny, dtype="float32")
    apply_lora(model, [LoraTarget("layers", 0, 1, ("attention.to_q",), rank=2, alpha=2.0, kind="lokr"),
                       LoraTarget("layers", 0, 1, ("attention.to_k",), rank=2, alpha=2.0)])  # fmt: skip
    mixed = read_lora(save_adapter(model, tmp_path / "mixed.safetensors"))
    with pytest.raises(UserError, match="one adapter kind per file"):
        write_lora(mixed, tmp_path / "x.safetensors", "diffusers")
    with pytest.raises(UserError, match="--format comfyui"):  # LoKr on q/k/v has no fused-qkv kohya form
        write_lora(mixed, tmp_path / "y.safetensors", "kohya")


def _comfy_weight_decompose(dora_scale, weight, diff):
    """comfy/weight_adapter/base.py weight_decompose at strength 1 (the fixed per-row norm, see above)."""
    merged = weight + diff
    if dora_scale.shape[0] == merged.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    return merged * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def _comfy_diff(lora: dict, x: str, alpha: float | None, loaded: set) -> torch.Tensor | None:
    """The ΔW of ComfyUI's lora / loha / lokr adapters for name `x` (already scaled), or None."""

    def take(name):
        key = f"{x}.{name}"
        if key in lora:
            loaded.add(key)
            return lora[key].float()
        return None

    for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
        if f"{x}{up}" in lora:
            u, d = take(up[1:]), take(down[1:])
            return (alpha / d.shape[0] if alpha is not None else 1.0) * (u @ d)
    if f"{x}.hada_w1_a" in lora:
        w1a, w1b, w2a, w2b = (take(f"hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
        return (alpha / w1b.shape[0] if alpha is not None else 1.0) * ((w1a @ w1b) * (w2a @ w2b))
    f = {n: take(f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}
    if f["w1"] is None and f["w1_a"] is None:
        return None
    dim = None
    if f["w1"] is None:
        dim, f["w1"] = f["w1_b"].shape[0], f["w1_a"] @ f["w1_b"]
    if f["w2"] is None:
        dim, f["w2"] = f["w2_b"].shape[0], f["w2_a"] @ f["w2_b"]
    return (alpha / dim if alpha is not None and dim is not None else 1.0) * torch.kron(f["w1"], f["w2"])


def _comfy_apply(lora: dict, state: dict, config) -> tuple[dict, set]:
    weights = {k: v.clone() for k, v in state.items()}
    loaded: set = set()
    for x, to in _comfy_key_map(state, config).items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        diff = _comfy_diff(lora, x, alpha, loaded)
        if diff is None:
            continue
        loaded |= {f"{x}.alpha"} & set(lora)
        key, offset = (to, None) if isinstance(to, str) else to
        weight = weights[key] if offset is None else weights[key].narrow(offset[0], offset[1], offset[2])
        diff = diff.reshape(weight.shape)
        if f"{x}.dora_scale" in lora:
            loaded.add(f"{x}.dora_scale")
            weight[:] = _comfy_weight_decompose(lora[f"{x}.dora_scale"].float(), weight, diff)
        else:
            weight += diff
    return weights, set(lora) - loaded


@pytest.mark.parametrize("kind, fmt", [(k, "comfyui") for k in KINDS] + [("loha", "kohya")])
def test_comfyui_applies_each_kind_exactly(tiny, adapters, tmp_path, kind, fmt):
    from safetensors.torch import load_file

    lora = read_lora(adapters[kind])
    exported = write_lora(lora, tmp_path / f"{kind}_{fmt}.safetensors", fmt, "float32")
    model = load_transformer(tiny, dtype="float32")
    base = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    state = _comfy_state(base)
    patched, not_loaded = _comfy_apply(load_file(str(exported)), state, model.config)
    assert not_loaded == set()  # no "lora key not loaded"
    trained = dict(base)
    for path, delta in lora.deltas.items():
        w = mx.array(base[f"{path}.weight"])
        trained[f"{path}.weight"] = np.array(w + delta.weight_delta(w))
    want = {k: v.numpy() for k, v in _comfy_state(trained).items()}
    errors = {k: float(np.abs(patched[k].numpy() - want[k]).max()) for k in want}
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda e: -e[1])[:3]
    assert any(".attention.qkv." in k and not np.array_equal(want[k], state[k].numpy()) for k in want)


def test_musubi_lokr_has_whole_w1_and_musubi_merges_it(tiny, tmp_path):
    """musubi-tuner's `networks/lokr.py` merge reads `lokr_w1` (whole) and `lokr_w2` or its pair, scale
    alpha / (w2_a columns, or W2's larger side): a decompose_both LoKr is written with W1 whole."""
    from safetensors.torch import load_file

    model = load_transformer(tiny, dtype="float32")
    apply_lora(model, [LoraTarget("layers", 0, 1, ("feed_forward.w1", "attention.to_q"), rank=2, alpha=3.0,
                                  kind="lokr", decompose_both=True)])  # fmt: skip
    rng = np.random.default_rng(3)
    for layer in lora_modules(model).values():
        for name in layer.TRAINABLE:
            layer[name] = mx.array(rng.standard_normal(layer[name].shape).astype(np.float32))
    lora = read_lora(save_adapter(model, tmp_path / "a.safetensors"))
    sd = load_file(str(write_lora(lora, tmp_path / "m.safetensors", "musubi", "float32")))
    for path, delta in lora.deltas.items():
        stem = "lora_unet_" + path.replace(".", "_")
        w1 = sd[f"{stem}.lokr_w1"]
        if f"{stem}.lokr_w2_a" in sd:
            w2, dim = sd[f"{stem}.lokr_w2_a"] @ sd[f"{stem}.lokr_w2_b"], sd[f"{stem}.lokr_w2_a"].shape[1]
        else:
            w2 = sd[f"{stem}.lokr_w2"]
            dim = max(w2.shape)
        got = sd[f"{stem}.alpha"].item() / dim * torch.kron(w1, w2)
        np.testing.assert_allclose(got.numpy(), np.array(delta.weight_delta()), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "algo, options",
    [("lokr", {"factor": 4}), ("lokr", {"decompose_both": True}), ("loha", {}),
     ("lokr", {"factor": 4, "weight_decompose": True}), ("loha", {"weight_decompose": True, "wd_on_out": False})],
)  # fmt: skip
def test_lycoris_made_files_are_read_and_give_lycoris_output(tiny, tmp_path, algo, options):
    from lycoris import LycorisNetwork

    reference = diffusers.ZImageTransformer2DModel.from_pretrained(tiny / "transformer").eval()
    LycorisNetwork.apply_preset({"target_module": ["ZImageTransformerBlock"], "target_name": []})
    network = LycorisNetwork(reference, 1.0, lora_dim=2, alpha=3.0, network_module=algo, **options)
    network.apply_to()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in network.named_parameters():
            scale = 1 + 0.2 * torch.randn(param.shape, generator=gen) if "dora_scale" in name else 0.3
            param.copy_(
                param * scale if "dora_scale" in name else scale * torch.randn(param.shape, generator=gen)
            )
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    x, t, caps = _inputs(1)
    want = _reference_out(reference, x, t, caps)
    got = _ours_out(tiny, x, t, caps, [path])
    base = _ours_out(tiny, x, t, caps)
    assert _rel(want, base) > 1e-2 and _rel(got, want) <= TOLERANCE
