"""Qwen3 text encoder (Z-Image's caption model), matching transformers' `Qwen3Model` in fp32.

Z-Image conditions on `hidden_states[-2]` of Qwen3: the output of the second-to-last decoder layer, before
the final norm. The last decoder layer is therefore never run (its output is unused), but its weights are
still built and loaded strictly, so a truncated checkpoint is reported like any other.

Parameter names are the ForCausalLM layout of the checkpoint (`model.layers.3.self_attn.q_proj.weight`), so
`sanitize` only drops the unused tied `lm_head.weight` and adds the `model.` prefix to checkpoints saved
from a bare `Qwen3Model` (which have none).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from zrecipe.errors import ModelError
from zrecipe.models.z_image.kernels import attention, swiglu
from zrecipe.models.z_image.weights import load_component


@dataclass(frozen=True)
class Qwen3Config:
    """The Qwen3 hyper-parameters the encoder needs (from `text_encoder/config.json`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, data: dict, source: str | Path = "text_encoder/config.json") -> Qwen3Config:
        """Build from a transformers config dict; extra keys are ignored, unsupported variants refused."""
        try:
            heads = int(data["num_attention_heads"])
            hidden = int(data["hidden_size"])
            kv_heads = data.get("num_key_value_heads")
            config = cls(
                vocab_size=int(data["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(data["intermediate_size"]),
                num_hidden_layers=int(data["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(kv_heads) if kv_heads is not None else heads,
                head_dim=int(data.get("head_dim") or hidden // heads),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(data, source),
                max_position_embeddings=int(data.get("max_position_embeddings", 40960)),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
                attention_bias=bool(data.get("attention_bias", False)),
            )
        except KeyError as exc:
            raise ModelError(f"{source}: missing key {exc.args[0]!r} in the Qwen3 config.") from exc
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid value in the Qwen3 config ({exc}).") from exc
        if data.get("hidden_act", "silu") != "silu":
            raise ModelError(f"{source}: hidden_act {data['hidden_act']!r} is not supported (Qwen3: silu).")
        if data.get("use_sliding_window", False):
            raise ModelError(f"{source}: use_sliding_window is true; sliding-window attention unsupported.")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ModelError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads.")
        return config


def _rope_theta(data: dict, source: str | Path) -> float:
    """RoPE base from either config style: transformers 5 `rope_parameters` or 4.x `rope_theta`."""
    # transformers 5 writes {"rope_parameters": {"rope_theta": ..., "rope_type": "default"}}; 4.x configs
    # (the published Qwen3 checkpoints) carry a top-level rope_theta and an optional rope_scaling.
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"{source}: rope type {rope_type!r} is not supported (only the default RoPE).")
    theta = params.get("rope_theta", data.get("rope_theta"))
    return float(theta) if theta is not None else 1_000_000.0


class Attention(nn.Module):
    """GQA self-attention with per-head RMSNorm on q and k and rotate-half RoPE."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.scale = config.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(batch, length, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # traditional=False is the rotate-half (GPT-NeoX) pairing (i, i + d/2) that transformers uses.
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        # GQA (fewer kv heads) is handled by broadcasting, without materialising repeated keys.
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The `model.` part of Qwen3ForCausalLM: embeddings, decoder layers, final norm."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        # Loaded (the checkpoint has it) but unused: hidden_states[-2] is taken before the final norm.
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen3TextEncoder(nn.Module):
    """Qwen3 returning `hidden_states[-2]`; `module(input_ids, attention_mask) -> (B, L, hidden)`."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """Hidden states after all decoder layers but the last (B, L, hidden), in the weights' dtype.

        `attention_mask` (B, L) is 1 for real tokens and 0 for padding; it is combined with the causal mask
        exactly as transformers does (a query sees earlier keys that are real tokens).
        """
        input_ids = mx.array(input_ids)
        length = input_ids.shape[1]
        positions = mx.arange(length)
        mask = positions[:, None] >= positions[None, :]
        if attention_mask is not None:
            keys_real = mx.array(attention_mask).astype(mx.bool_)
            mask = mx.logical_and(mask[None, None], keys_real[:, None, None, :])
        hidden = self.model.embed_tokens(input_ids)
        # hidden_states = (embeddings, layer 0 out, ..., layer n-2 out, norm(layer n-1 out)): index -2 is
        # the output of layer n-2, so the last layer is skipped entirely.
        for layer in self.model.layers[:-1]:
            hidden = layer(hidden, mask)
        return hidden

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Checkpoint → module keys: drop what the encoder does not use (the tied `lm_head`, mflux-save's
        RoPE table `rotary_emb.inv_freq`); prefix `model.` where a bare Qwen3Model or mflux-save has none.

        Accepts transformers' Qwen3ForCausalLM layout (the diffusers `text_encoder/` folder and ComfyUI's
        `qwen_3_4b.safetensors`, which uses the same names) and mflux-save's `text_encoder/`."""
        out = {}
        for key, value in weights.items():
            if key.startswith(_UNUSED_PREFIXES) or key.removeprefix("model.").startswith(_UNUSED_PREFIXES):
                continue
            out[key if key.startswith("model.") else "model." + key] = value
        return out


# Checkpoint tensors the encoder does not use: the tied LM head, and mflux-save's precomputed RoPE frequencies.
_UNUSED_PREFIXES = ("lm_head.", "rotary_emb.")


def load_text_encoder(path: str | Path, dtype=None) -> Qwen3TextEncoder:
    """Load the Qwen3 text encoder from a model folder (with `text_encoder/`) or the component folder.

    `dtype`: an mx dtype or its name; default float32 on the CPU, bfloat16 on a GPU. Weights stay lazy
    (memory-mapped) until first used, so the skipped last layer is never materialised.
    """

    def build(config: dict, source: Path) -> Qwen3TextEncoder:
        return Qwen3TextEncoder(Qwen3Config.from_dict(config, source=source))

    model = load_component(path, "text_encoder", build, dtype)
    model.eval()
    return model


def encode_prompts(
    text_encoder: Qwen3TextEncoder, tokenizer, prompts: list[str], max_length: int = 512
) -> list[mx.array]:
    """Caption embeddings as the Z-Image pipeline makes them: one (L_i, hidden) array per prompt.

    Each prompt is wrapped in the chat template, tokenized (truncated at `max_length`), and the rows of
    `hidden_states[-2]` for its real tokens are kept. The batch is padded to its longest prompt only: with
    causal attention and right padding, padding never changes the real tokens' rows.
    """
    input_ids, attention_mask = tokenizer.encode(list(prompts), max_length=max_length)
    hidden = text_encoder(mx.array(input_ids), mx.array(attention_mask))
    lengths = attention_mask.sum(axis=1).tolist()
    return [hidden[i, : int(n)] for i, n in enumerate(lengths)]
