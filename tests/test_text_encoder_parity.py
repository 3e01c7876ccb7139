"""Parity of the MLX Qwen3 text encoder and `encode_prompts` with transformers / diffusers (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.models.z_image import tiny
from zrecipe.models.z_image.text_encoder import encode_prompts, load_text_encoder
from zrecipe.models.z_image.tokenizer import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

MAX_REL = 1e-4


def max_rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomise(module, seed: int) -> None:
    """Every parameter random (norm scales too, so an ignored norm weight is caught)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim == 1:
                param.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)


CONFIGS = {
    # head_dim * heads != hidden, GQA 6 → 2, transformers 5 rope_parameters, untied lm_head to drop.
    "gqa_untied": dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=12,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
    # Qwen3-4B's ratios (4 q heads per kv head, theta 1e6), tied, one layer used of two.
    "tied": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3Model"])
def test_hidden_states_minus_two_match_transformers(name, architecture, tmp_path):
    config = transformers.Qwen3Config(**CONFIGS[name])
    torch.manual_seed(0)
    ref = getattr(transformers, architecture)(config).eval()
    randomise(ref, seed=1)
    ref.save_pretrained(tmp_path / "text_encoder")

    rng = np.random.RandomState(0)
    lengths = [37, 5, 20]  # a batch with right padding, as the pipeline tokenizes
    width = max(lengths)
    ids = rng.randint(0, config.vocab_size, size=(len(lengths), width))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask).bool(), output_hidden_states=True
        )
    expected = out.hidden_states[-2].numpy()

    model = load_text_encoder(tmp_path, dtype=mx.float32)
    got = np.array(model(mx.array(ids, dtype=mx.int32), mx.array(mask)))
    assert got.shape == expected.shape
    for i, n in enumerate(lengths):
        assert max_rel_err(got[i, :n], expected[i, :n]) <= MAX_REL
    assert max_rel_err(got, expected) <= MAX_REL  # padded rows too


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_text_parity")
    ids = tiny.write_tokenizer(root / "tokenizer")
    config = tiny.text_encoder_config(-(-len(ids) // 64) * 64, ids)
    tiny.write_text_encoder(root / "text_encoder", config, seed=3, dtype="float32")
    return root


def test_encode_prompts_equals_the_pipelines_prompt_embeddings(tiny_text):
    diffusers = pytest.importorskip("diffusers")
    text_encoder = transformers.Qwen3Model.from_pretrained(tiny_text / "text_encoder").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_text / "tokenizer")
    # Only the text half of the pipeline is needed for encode_prompt.
    pipe = diffusers.ZImagePipeline(
        scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None
    )
    prompts = ["A photograph of a red fox in fresh snow.", "cat", "Ünïcode — 東京 <think> 42%"]
    with torch.no_grad():
        # A copy: the pipeline overwrites its prompt list with the templated strings.
        pos, neg = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=True)

    ours_model, ours_tok = load_text_encoder(tiny_text, dtype="float32"), load_tokenizer(tiny_text)
    ours = encode_prompts(ours_model, ours_tok, prompts)
    ours_neg = encode_prompts(ours_model, ours_tok, [""] * len(prompts))  # the default negative prompt
    for got, want in zip(ours + ours_neg, list(pos) + list(neg), strict=True):
        assert tuple(got.shape) == tuple(want.shape)
        assert max_rel_err(np.array(got), want.numpy()) <= MAX_REL


def test_long_prompt_is_truncated_like_the_pipeline(tiny_text):
    diffusers = pytest.importorskip("diffusers")
    text_encoder = transformers.Qwen3Model.from_pretrained(tiny_text / "text_encoder").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_text / "tokenizer")
    pipe = diffusers.ZImagePipeline(
        scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None
    )
    prompt = " ".join(["golden", "harbour", "lighthouse", "7"] * 60)  # > 64 tokens after templating
    with torch.no_grad():
        (want,), _ = pipe.encode_prompt(
            prompt, device="cpu", do_classifier_free_guidance=False, max_sequence_length=64
        )
    (got,) = encode_prompts(
        load_text_encoder(tiny_text, dtype="float32"), load_tokenizer(tiny_text), [prompt], max_length=64
    )
    assert got.shape == (64, 64) and tuple(want.shape) == (64, 64)
    assert max_rel_err(np.array(got), want.numpy()) <= MAX_REL
