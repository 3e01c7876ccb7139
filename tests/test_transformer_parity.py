"""Numerical parity of ZImageTransformer with diffusers' ZImageTransformer2DModel (fp32, CPU).

Tiny random configs are built and saved by diffusers (`save_pretrained`) and loaded by zrecipe's loader.
Relative error = max|ours − reference| / max|reference|, required ≤ 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import mlx.core as mx

from zrecipe.errors import ModelError
from zrecipe.models.z_image.transformer import load_transformer

pytestmark = pytest.mark.parity
TOLERANCE = 1e-4

CONFIGS = {
    # dim < 256: the adaLN width is dim; head_dim 24 (not a power of two).
    "small": {
        "dim": 48,
        "n_heads": 2,
        "n_kv_heads": 2,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "cap_feat_dim": 32,
        "axes_dims": [8, 8, 8],
        "axes_lens": [256, 64, 64],
    },
    # dim > 256: the adaLN width is capped at 256; head_dim 44; another RoPE theta.
    "wide": {
        "dim": 264,
        "n_heads": 6,
        "n_kv_heads": 6,
        "n_layers": 1,
        "n_refiner_layers": 1,
        "cap_feat_dim": 24,
        "axes_dims": [12, 16, 16],
        "axes_lens": [256, 64, 64],
        "rope_theta": 100.0,
    },
}


def randomise(model, seed: int) -> None:
    """Every parameter random (norm weights around 1, pad tokens and biases included) so nothing is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "pad_token" in name:
                p.copy_(0.5 * noise)
            elif p.ndim == 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(diffusers model, zrecipe model loaded from its save_pretrained folder, config)."""
    config = CONFIGS[request.param]
    reference = diffusers.ZImageTransformer2DModel(in_channels=16, **config).eval()
    randomise(reference, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param) / "transformer"
    reference.save_pretrained(folder)
    return reference, load_transformer(folder, dtype="float32"), config, folder


def make_inputs(config, lens, h, w, times, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lens), 16, h, w, generator=gen)
    caps = [torch.randn(n, config["cap_feat_dim"], generator=gen) for n in lens]
    return x, torch.tensor(times, dtype=torch.float32), caps


def run_reference(model, x, t, caps) -> np.ndarray:
    with torch.no_grad():
        out = model([xi[:, None] for xi in x], t, caps, return_dict=False)[0]  # items are (C, F=1, H, W)
    return torch.stack([o[:, 0] for o in out]).numpy()


def run_ours(model, x, t, caps) -> np.ndarray:
    return np.array(model(mx.array(x.numpy()), mx.array(t.numpy()), [mx.array(c.numpy()) for c in caps]))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize(
    "lens, h, w, times",
    [
        ((7,), 6, 10, (0.0,)),  # odd 3×5 token grid, caption shorter than 32
        ((45,), 8, 8, (0.37,)),  # caption longer than 32 (padded to 64)
        ((7, 45), 6, 10, (0.93, 0.5)),  # batch of two with different caption lengths: batch padding masked
        ((32, 33), 4, 12, (1.0, 0.25)),  # exact multiple of 32 next to one pad-heavy caption
    ],
)
def test_forward_matches_diffusers(pair, lens, h, w, times):
    reference, ours, config, _ = pair
    x, t, caps = make_inputs(config, lens, h, w, times)
    expected = run_reference(reference, x, t, caps)
    assert np.abs(expected).max() > 0.1  # a non-trivial output
    got = run_ours(ours, x, t, caps)
    assert relative_error(got, expected) <= TOLERANCE
    for i in range(len(lens)):  # every batch item equals its single-item run
        single = run_ours(ours, x[i : i + 1], t[i : i + 1], caps[i : i + 1])
        assert relative_error(got[i : i + 1], single) <= 1e-6


def test_original_checkpoint_naming_loads_to_the_same_outputs(pair, tmp_path):
    from safetensors.torch import save_file

    reference, _, config, folder = pair
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    original = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            value = torch.cat([state[key.replace("to_q", n)] for n in ("to_q", "to_k", "to_v")], dim=0)
            key = key.replace("to_q", "qkv")
        for new, old in (
            ("all_x_embedder.2-1.", "x_embedder."),
            ("all_final_layer.2-1.", "final_layer."),
            (".to_out.0.", ".out."),
            (".norm_q.", ".q_norm."),
            (".norm_k.", ".k_norm."),
        ):
            key = key.replace(new, old)
        original["model.diffusion_model." + key] = value.contiguous()
    # Check the inverse mapping is diffusers' own single-file conversion before trusting it.
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert sorted(converted) == sorted(state)

    target = tmp_path / "transformer"
    target.mkdir()
    (target / "config.json").write_text((folder / "config.json").read_text())
    save_file(original, str(target / "model.safetensors"))
    x, t, caps = make_inputs(config, (7, 45), 6, 10, (0.6, 0.2))
    expected = run_reference(reference, x, t, caps)
    assert (
        relative_error(run_ours(load_transformer(target, dtype="float32"), x, t, caps), expected) <= TOLERANCE
    )


def test_missing_or_misshaped_tensor_is_one_model_error(pair, tmp_path):
    from safetensors.torch import save_file

    reference, _, _, folder = pair
    state = {k: v.detach().clone().contiguous() for k, v in reference.state_dict().items()}
    del state["layers.0.attention.to_k.weight"]
    state["x_pad_token"] = torch.zeros(2, state["x_pad_token"].shape[1])
    target = tmp_path / "transformer"
    target.mkdir()
    (target / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(target / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelError) as info:
        load_transformer(target)
    assert "missing (1): layers.0.attention.to_k.weight" in str(info.value)
    assert "mis-shaped (1): x_pad_token" in str(info.value)
