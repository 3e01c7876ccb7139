"""Tokenizer and prompt template: exact template string, truncation, padding, parity with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zrecipe.errors import ModelError
from zrecipe.models.z_image import tiny
from zrecipe.models.z_image.tokenizer import QWEN3_CHAT_TEMPLATE, TEMPLATE, apply_template, load_tokenizer

PROMPTS = [
    "A photograph of a red fox in fresh snow, golden light.",
    "",
    "cat",
    "Ünïcode — 東京, emoji 🦊 and digits 12345 3.5%",
    "  leading spaces\nnew line\ttab <think> and </think> and <|im_end|> inside",
]


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_tok")
    tiny.write_tokenizer(root / "tokenizer")
    return root


def test_documented_template_string():
    assert TEMPLATE.format(prompt="a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert apply_template("a cat") == TEMPLATE.format(prompt="a cat")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_qwen3_template_renders_the_documented_string(prompt):
    pytest.importorskip("jinja2")
    assert apply_template(prompt, QWEN3_CHAT_TEMPLATE) == TEMPLATE.format(prompt=prompt)


def test_the_models_own_template_is_used(tok_folder, tmp_path):
    pytest.importorskip("jinja2")
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((tok_folder / "tokenizer" / "tokenizer.json").read_text())
    config = json.loads((tok_folder / "tokenizer" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).apply_template("hi") == "[user:hi]"
    # transformers 5 saves the template beside the config; that file wins.
    (folder / "chat_template.jinja").write_text("<{{ messages[0].content }}>")
    assert load_tokenizer(folder).apply_template("hi") == "<hi>"


def test_no_template_falls_back_to_the_documented_string(tok_folder, tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((tok_folder / "tokenizer" / "tokenizer.json").read_text())
    assert load_tokenizer(folder).apply_template("x") == TEMPLATE.format(prompt="x")


def test_encode_pads_right_and_masks(tok_folder):
    tokenizer = load_tokenizer(tok_folder)
    ids, mask = tokenizer.encode(["a red fox in the snow", ""])
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    lengths = mask.sum(axis=1)
    assert lengths[0] > lengths[1] and ids.shape[1] == lengths[0]
    assert (ids[1, lengths[1] :] == tokenizer.pad_token_id).all()
    assert mask[1, : lengths[1]].all() and not mask[1, lengths[1] :].any()
    im_start = tokenizer.tokenizer.token_to_id("<|im_start|>")
    assert ids[0, 0] == im_start and ids[1, 0] == im_start  # the empty prompt is templated too


def test_truncation_keeps_the_first_max_length_tokens(tok_folder):
    tokenizer = load_tokenizer(tok_folder)
    long_prompt = "golden harbour lighthouse " * 300
    full = tokenizer.tokenizer.encode(tokenizer.apply_template(long_prompt)).ids
    assert len(full) > 512
    ids, mask = tokenizer.encode([long_prompt, "cat"])
    assert ids.shape == (2, 512) and mask[0].all()
    assert ids[0].tolist() == full[:512]
    ids, _ = tokenizer.encode([long_prompt], max_length=100)
    assert ids.shape == (1, 100)


def test_missing_tokenizer_and_bad_pad_token_are_model_errors(tok_folder, tmp_path):
    with pytest.raises(ModelError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((tok_folder / "tokenizer" / "tokenizer.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|nope|>"}))
    with pytest.raises(ModelError, match="<\\|nope\\|>"):
        load_tokenizer(tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parity
def test_ids_and_template_equal_transformers(tok_folder):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tok_folder / "tokenizer")
    ours = load_tokenizer(tok_folder)
    assert ours.pad_token_id == reference.pad_token_id
    assert ours.vocab_size == len(reference)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        assert text == TEMPLATE.format(prompt=prompt) == ours.apply_template(prompt)
    # The pipeline's call: pad to max_length, truncate. Ours pads to the batch's longest prompt only.
    long_prompt = "lighthouse on a rocky cliff " * 120
    prompts = PROMPTS + [long_prompt]
    texts = [ours.apply_template(p) for p in prompts]
    want = reference(texts, padding="max_length", max_length=512, truncation=True)
    ids, mask = ours.encode(prompts)
    want_ids, want_mask = np.array(want.input_ids), np.array(want.attention_mask)
    np.testing.assert_array_equal(ids, want_ids[:, : ids.shape[1]])
    np.testing.assert_array_equal(mask, want_mask[:, : ids.shape[1]])
    assert not want_mask[:, ids.shape[1] :].any()
