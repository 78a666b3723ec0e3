"""Tiny Hugging Face model folders for tokenizer tests, built offline in a temporary folder.

:func:`build_tiny_model` writes ``tokenizer.json`` (a byte-level BPE of a few hundred tokens
trained on a small built-in English, code and Unicode corpus, with Llama-3 and ChatML special
tokens and a post-processor that adds BOS), ``tokenizer_config.json`` and a chat template in
one of three shapes: ``llama3`` (BOS written by the template, header tokens, tools as indented
JSON, a date line), ``chatml`` (no BOS in the template, tools, tool calls, reasoning,
``enable_thinking``), and ``parts`` (loops over a message's content parts, as multimodal
templates do). :func:`install_in_hf_cache` lays a folder out as a Hugging Face cache entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS_TEXT, EOT, START_HEADER, END_HEADER, IM_START, IM_END, PAD]
# Added but not special, as Qwen's tool-call markers are.
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst.",
    "Kubernetes routes each request to the pod whose KV cache already holds the prompt prefix.",
    "Please summarise the following document in three sentences, then list its key points.",
    "You are a helpful assistant. Answer briefly and cite the tool results you rely on.",
    "What is the weather in Paris today? It is sunny, 21 degrees, with a light breeze.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1)\n",
    "for (let i = 0; i < items.length; i++) { console.log(items[i].name); }",
    'SELECT name, count(*) FROM users WHERE created_at > now() GROUP BY name;\n{"k": [1, 2]}',
    "    indented line\n\ttabbed line\n\n\nthree newlines   and   spaces  ",
    "Café, naïve, façade, résumé, Ångström, Straße, Øresund, jalapeño, über.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Emoji: 🚀🔥👍🏽 🇫🇷 👩‍💻 and symbols ∑ ∫ √ ≠ ≤ ≥ → ← ✓ © ®.",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم! שלום עולם! नमस्ते दुनिया!",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -42 1e-9 0xFF.",
]

LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message or tools is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
    {{- 'Today Date: ' + date_string + '\\n\\n' }}
    {%- if tools is not none %}
        {{- 'You may call these functions. Reply with JSON {"name": ..., '
            + '"parameters": ...}.\\n\\n' }}
        {%- for tool in tools %}
            {{- tool | tojson(indent=4) }}
            {{- '\\n\\n' }}
        {%- endfor %}
    {%- endif %}
    {{- system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception('Conversation roles must be user, assistant or tool; got '
            ~ message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'assistant' and message['tool_calls'] is defined %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- for call in message['tool_calls'] %}
            {{- '{"name": "' + call['function']['name'] + '", "parameters": ' }}
            {{- call['function']['arguments'] | tojson }}
            {{- '}' }}
        {%- endfor %}
        {{- '<|eot_id|>' }}
    {%- elif message['role'] in ['tool', 'ipython'] %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {{- message['content'] | tojson }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions.\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nWrap each call in <tool_call></tool_call> tags.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('System message must come first') }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.reasoning_content is defined and message.reasoning_content %}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls | default([]) %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}
                {{- call.arguments }}
            {%- else %}
                {{- call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

PARTS_TEMPLATE = """\
{{- bos_token }}
{%- set conversation = messages %}
{%- for message in conversation %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] | selectattr('type', 'equalto', 'text') %}
            {{- part['text'] }}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "parts": PARTS_TEMPLATE}
TemplateKind = Literal["llama3", "chatml", "parts"]


@functools.lru_cache(maxsize=2)
def trained_tokenizer_json(add_bos: bool = True) -> str:
    """The serialized tiny tokenizer (trained once per process; training takes a moment)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in PLAIN_ADDED_TOKENS])
    steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        steps.append(
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, tok.token_to_id(BOS))],
            )
        )
    tok.post_processor = processors.Sequence(steps)
    return tok.to_str()


def build_tiny_model(
    dest: Path,
    template: TemplateKind | None = "llama3",
    *,
    add_bos: bool = True,
    named_templates: Mapping[str, str] | None = None,
    template_file: bool = False,
    config: Mapping[str, Any] | None = None,
    special_tokens_map: Mapping[str, Any] | None = None,
    tokenizer_json_edit: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny model folder at ``dest`` (created) and return it.

    ``template`` picks the chat template shape (``None`` for no template); ``named_templates``
    stores a list of named templates in ``tokenizer_config.json`` instead; ``template_file``
    writes the template to ``chat_template.jinja`` rather than the config. ``config`` entries
    override ``tokenizer_config.json`` keys (a ``None`` value deletes the key);
    ``special_tokens_map`` writes ``special_tokens_map.json``; ``tokenizer_json_edit`` sets
    top-level keys of ``tokenizer.json`` (e.g. ``truncation``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads(trained_tokenizer_json(add_bos))
    tokenizer.update(tokenizer_json_edit or {})
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), "utf-8")

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT if template != "chatml" else IM_END,
        "pad_token": PAD,
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
    }
    if named_templates is not None:
        cfg["chat_template"] = [{"name": k, "template": v} for k, v in named_templates.items()]
    elif template is not None and template_file:
        (dest / "chat_template.jinja").write_text(TEMPLATES[template], "utf-8")
    elif template is not None:
        cfg["chat_template"] = TEMPLATES[template]
    for key, value in (config or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), "utf-8")
    if special_tokens_map is not None:
        (dest / "special_tokens_map.json").write_text(json.dumps(special_tokens_map), "utf-8")
    return dest


def install_in_hf_cache(
    model_dir: Path, cache_root: Path, repo_id: str, *, commit: str | None = None
) -> Path:
    """Copy ``model_dir`` into ``cache_root`` as the Hugging Face cache stores a download
    (``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks to the blobs,
    ``refs/main`` holding the commit) and return the snapshot folder."""
    repo = cache_root / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(commit, "utf-8")
    return snapshot


def copy_model(src: Path, dest: Path) -> Path:
    """A copy of a model folder (for tests that then edit or delete files in it)."""
    shutil.copytree(src, dest)
    return dest
