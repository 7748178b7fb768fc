"""A tokenizer for ShapeWorld: byte-level BPE trained on the world's own text, with Qwen2's special tokens
and the Qwen2-VL chat template, saved as an HF tokenizer directory that `AutoTokenizer` loads.

Why: the byte tokenizer (viper_common.tiny_tokenizer) spends one token per character, so a caption is a few
hundred tokens; a BPE vocabulary of about a thousand entries learns the world's few hundred words whole,
cutting sequences several-fold (measured by `tokens_per_text`). Byte-level BPE keeps every byte in its
alphabet, so any text (a user's typo, a letter the world never uses) still round-trips.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from viper_common.tiny_tokenizer import QWEN2_VL_CHAT_TEMPLATE

# Qwen2's special tokens: <|endoftext|> first (the pad token), then the chat and vision markers.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
DEFAULT_VOCAB_SIZE = 1024


def world_texts(n_scenes: int = 2000) -> Iterator[str]:
    """The text a ShapeWorld model reads and writes: the project's prompts, the evaluation's instructions,
    and, for n_scenes scenes from the base_train seed range, captions, base-data prompts and answers, coarse
    differences, benchmark-style questions and options, and edit instructions. No image is rendered."""
    from viper_common import prompts
    from viper_common.shapeworld import base_data, edit_skills, edits, follow_skills, language, questions
    from viper_common.shapeworld.scene import sample_scene
    from viper_common.shapeworld.splits import SEED_RANGES
    from viper_jax.evaluation import tsv

    yield from prompts.TRAINING_PROMPTS.values()
    yield from prompts.SYNTHESIS_PROMPTS.values()
    yield edit_skills.EDIT_PROMPT
    yield from (*follow_skills.TEXT_INTROS, *follow_skills.LIST_INSTRUCTIONS, *follow_skills.FORMAT_INSTRUCTIONS,
                follow_skills.ASK_THINK)
    yield from (prompts.RESPONSE_FORMAT, tsv.MCQ_INSTRUCTION, tsv.YES_NO_INSTRUCTION, "You are a helpful assistant.",
                "system\nuser\nassistant\n", "Question: \nOptions:\nA. \nB. \nC. \nD. \nHint: ")
    start = SEED_RANGES["base_train"].start
    for k in range(n_scenes):
        rng = np.random.default_rng([start + k, 7])  # not the base data's own draws: the same kinds of text
        scene = sample_scene(rng)
        yield language.caption(scene, rng)
        for make in (base_data.describe, base_data.ask, base_data.choose):
            yield from make(scene, rng)
        yield base_data.coarse_change(scene, rng)[1]
        for category in questions.CATEGORIES:
            q = questions.make_question(category, start + k, k)
            if q is not None:
                yield q.question
                yield from q.options
        try:  # with the '<type>: ' prefix, as synthesis writes edit instructions
            yield edits.instruction(edits.random_edit(scene, rng), scene, rng)
        except edits.EditError:
            pass


def build_world_tokenizer(out_dir: str | os.PathLike | None, texts: Iterable[str],
                          vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """Trains byte-level BPE on `texts`, wraps it as a Qwen2 tokenizer with the Qwen2-VL chat template and
    saves it to `out_dir` (when given). Returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the 256 bytes plus {len(SPECIAL_TOKENS)} specials")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token=None, bos_token=None)
    hf.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    hf.chat_template = QWEN2_VL_CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def tokens_per_text(tokenizer: Any, texts: Iterable[str]) -> float:
    """Mean number of tokens per text (no special tokens)."""
    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return float(np.mean(counts)) if counts else 0.0
