"""Qwen3 tokenizer and Z-Image's prompt template.

The pipeline wraps every prompt (the empty negative prompt included) in the Qwen3 chat template with
`enable_thinking=True`, which renders exactly `TEMPLATE`; it tokenizes with right padding and truncates at
512 tokens. The template is rendered from the model's own `chat_template` when jinja2 is installed (so a
model with a different template is honoured) and from `TEMPLATE` otherwise.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from zrecipe.errors import ModelError

TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
"""What the Qwen3 chat template yields for one user message, add_generation_prompt, enable_thinking=True."""

MAX_LENGTH = 512

QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
"""The Qwen3 (Qwen3-4B) chat template as published in its tokenizer_config.json; the tiny model carries it."""


def apply_template(prompt: str, chat_template: str | None = None, special_tokens: dict | None = None) -> str:
    """The prompt wrapped as the Z-Image pipeline does (one user turn + the assistant generation prompt)."""
    if chat_template is None:
        return TEMPLATE.format(prompt=prompt)
    try:
        import jinja2  # noqa: F401  (optional: without it the documented string is used)
    except ImportError:
        return TEMPLATE.format(prompt=prompt)
    return _compile(chat_template).render(
        messages=[{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        enable_thinking=True,
        **(special_tokens or {}),
    )


@lru_cache(maxsize=8)  # compiling the Qwen3 template costs ~ms; datasets have 100k captions
def _compile(chat_template: str):
    """A sandboxed jinja environment set up as transformers sets it (trim/lstrip blocks, tojson, loops)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers replaces jinja's tojson (which HTML-escapes) by plain json.dumps.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template)


class PromptTokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and pad token of a Qwen3 tokenizer folder."""

    def __init__(
        self, tokenizer, chat_template: str | None, pad_token: str, source: str | Path = "tokenizer"
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.source = Path(source)
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ModelError(f"{self.source}: pad token {pad_token!r} is not in tokenizer.json's vocabulary.")
        self.pad_token_id = int(pad_id)
        self.special_tokens = {"pad_token": pad_token}
        if chat_template is not None:
            # Fail at load time, naming the file, rather than on the first caption.
            try:
                self.apply_template("")
            except Exception as exc:
                raise ModelError(f"{self.source}: the chat template cannot be rendered ({exc}).") from exc

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def apply_template(self, prompt: str) -> str:
        """`prompt` wrapped in this tokenizer's chat template (enable_thinking=True)."""
        return apply_template(prompt, self.chat_template, self.special_tokens)

    def encode(self, prompts: list[str], max_length: int = MAX_LENGTH):
        """Templated, tokenized prompts as numpy int32 (input_ids, attention_mask), right-padded.

        Each prompt is truncated to its first `max_length` tokens (as the pipeline's `truncation=True`);
        the batch is padded to its longest member with the pad token.
        """
        import numpy as np

        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [self.apply_template(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        rows = [e.ids[:max_length] for e in encodings]
        width = max((len(r) for r in rows), default=0)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask


def _read_chat_template(folder: Path, config: dict) -> str | None:
    """The chat template: `chat_template.jinja` (transformers 5 layout) or tokenizer_config's key."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer(path: str | Path) -> PromptTokenizer:
    """Load `tokenizer/tokenizer.json` (+ tokenizer_config.json) from a model folder or the folder itself."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ModelError(f"{file}: tokenizer file not found; is {path} a diffusers-layout model folder?")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed json
        raise ModelError(f"{file}: cannot read the tokenizer ({exc}).") from exc
    # Truncation and padding are ours to apply (as the pipeline does); ignore any stored in the file.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    config_file = folder / "tokenizer_config.json"
    config: dict = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"{config_file}: invalid JSON ({exc}).") from exc
    pad = config.get("pad_token") or "<|endoftext|>"
    if isinstance(pad, dict):  # AddedToken serialised as {"content": ...}
        pad = pad.get("content", "<|endoftext|>")
    return PromptTokenizer(tokenizer, _read_chat_template(folder, config), pad, source=folder)
