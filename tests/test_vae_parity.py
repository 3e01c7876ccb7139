"""Numerical parity of the MLX AutoencoderKL with diffusers' (CPU, fp32), loaded from `save_pretrained`."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
mx = pytest.importorskip("mlx.core")

from zrecipe.models.z_image.vae import load_vae

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4  # max|ours − diffusers| / max|diffusers|


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A three-level (factor 4) diffusers VAE with every weight randomised, and zrecipe's load of it."""
    # These convs are tiny: one torch thread is ~30× cheaper than two on a shared, busy CPU (spin-waits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32],
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()
    with torch.no_grad():
        # diffusers initialises norms to (1, 0): randomise them too, so an ignored norm parameter shows.
        for name, p in reference.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(folder)
    yield reference, load_vae(folder, dtype="float32")
    torch.set_num_threads(threads)


def nchw_to_mx(t):
    return mx.array(t.permute(0, 2, 3, 1).numpy())


def rel_error(ours, theirs) -> float:
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    return float(np.abs(np.array(ours) - theirs).max() / np.abs(theirs).max())


def test_encode_mean_logvar_and_decode_match_diffusers(models):
    reference, ours = models
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 80) * 2 - 1  # non-square, batch of two
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
        decoded = reference.decode(posterior.mean).sample
    mean, logvar = ours.encode_with_logvar(nchw_to_mx(x))
    assert mean.shape == (2, 12, 20, 16)
    assert rel_error(mean, posterior.mean) <= TOLERANCE
    assert rel_error(logvar, posterior.logvar) <= TOLERANCE
    assert rel_error(ours.decode(nchw_to_mx(posterior.mean)), decoded) <= TOLERANCE


def test_tiled_encode_and_decode_match_diffusers_tiling(models):
    reference, ours = models
    reference.enable_tiling()
    # 32 px tiles = 8 latents; blend over a quarter, as zrecipe's `tile=32`.
    reference.tile_sample_min_size, reference.tile_latent_min_size = 32, 8
    torch.manual_seed(2)
    x = torch.rand(1, 3, 40, 72) * 2 - 1  # 2×3 tiles, ragged on both axes
    try:
        with torch.no_grad():
            mean = reference.encode(x).latent_dist.mean
            decoded = reference.decode(mean).sample
    finally:
        reference.disable_tiling()
    assert rel_error(ours.encode(nchw_to_mx(x), tile=32), mean) <= TOLERANCE
    assert rel_error(ours.decode(nchw_to_mx(mean), tile=32), decoded) <= TOLERANCE
