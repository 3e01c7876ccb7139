"""`generate`'s sampling equals diffusers' ZImagePipeline on the tiny model (same noise, fp32, CPU).

Two comparisons per setting: with zrecipe's prompt embeddings handed to the pipeline (the sampler alone),
and with the prompt text (tokenizer + template + text encoder + sampler end to end).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from zrecipe.generation.generate import GenerationSettings, encode_text, initial_noise, sample_latents
from zrecipe.models.z_image.sampler import read_scheduler_config
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer

pytestmark = pytest.mark.parity
TOLERANCE = 1e-4
PROMPT, NEGATIVE = "a red cube on a table", "blurry"
W, H, STEPS, SEED = 64, 48, 4, 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    folder = create_tiny_model(tmp_path_factory.mktemp("gen_parity") / "tiny", seed=11)
    pipe = diffusers.ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_text(folder, [PROMPT, NEGATIVE], dtype="float32")
    return folder, pipe, load_transformer(folder, dtype="float32"), embeds


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# Truncation 0.15: with shift 6 and 4 steps the normalised times are 0, .05, .14, .33, so guidance is
# dropped on the last step only.
@pytest.mark.parametrize("guidance, norm, trunc", [(0.0, False, 1.0), (4.0, False, 1.0), (4.0, True, 0.15)])
def test_generate_latents_match_pipeline(env, guidance, norm, trunc):
    folder, pipe, transformer, (pos, neg) = env
    settings = GenerationSettings(PROMPT, NEGATIVE, guidance, STEPS, W, H, (SEED,), norm, trunc)
    ours = np.array(
        sample_latents(
            transformer, read_scheduler_config(folder), settings, SEED, pos, neg if guidance > 0 else None
        )
    )
    noise = torch.tensor(np.array(initial_noise(SEED, W, H)))
    common = dict(
        latents=noise,
        guidance_scale=guidance,
        num_inference_steps=STEPS,
        height=H,
        width=W,
        cfg_normalization=norm,
        cfg_truncation=trunc,
        output_type="latent",
    )
    with torch.no_grad():
        from_embeds = pipe(
            prompt_embeds=[torch.tensor(np.array(pos))],
            negative_prompt_embeds=[torch.tensor(np.array(neg))],
            **common,
        ).images.numpy()
        from_text = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, **common).images.numpy()
    assert ours.shape == from_embeds.shape == (1, 16, H // 8, W // 8)
    assert _rel(ours, from_embeds) <= TOLERANCE
    assert _rel(ours, from_text) <= TOLERANCE
    if norm:  # the options really change the result (the comparison above is not vacuous)
        plain = GenerationSettings(PROMPT, NEGATIVE, guidance, STEPS, W, H, (SEED,))
        other = np.array(sample_latents(transformer, read_scheduler_config(folder), plain, SEED, pos, neg))
        assert _rel(other, ours) > 1e-3
