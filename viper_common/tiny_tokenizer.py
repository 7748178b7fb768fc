"""A tiny, file-free Qwen2-VL tokenizer for tests and the CPU demo, shared by both sides (no jax, no torch).

Byte-level BPE with no merges: every UTF-8 byte is one token (id == byte value), so any text
round-trips, and the Qwen2-VL special tokens are added on top with the real Qwen2-VL chat template.
It behaves like the real tokenizer everywhere the pipeline cares (special-token splitting, the chat
template, image placeholder expansion); only the ids and the sequence lengths differ.

Why not files: transformers v5's `Qwen2Tokenizer(vocab_file=...)` silently yields an empty vocabulary,
and tests must not download. `vocab=`/`merges=` in memory works (shared/reference/verified_here.md).
"""

from __future__ import annotations

import os
from typing import Any

# Qwen2-VL-*-Instruct's chat_template, verbatim (also used by Qwen2.5-VL). Images become
# <|vision_start|><|image_pad|><|vision_end|>; the processor then expands each <|image_pad|> into
# grid.prod() / merge_size**2 copies. A default system message is inserted when none is given.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Added after the 256 byte tokens, in this order. eos and pad are registered by the constructor first.
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>")


def build_tiny_tokenizer(save_dir: str | os.PathLike | None = None) -> Any:
    """Returns a `Qwen2Tokenizer` (vocabulary 256 bytes + 7 specials); saved to `save_dir` if given.

    `tokenizer.save_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` round-trip offline, template
    included. Special-token ids: read them with `convert_tokens_to_ids` rather than hard-coding them.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()  # byte value -> the printable character byte-level BPE uses for it
    vocab = {byte_chars[b]: b for b in range(256)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok
