"""`viper sft` examples: a record -> prompt + answer tokens, and batches with an answer-token loss mask.

The prompt is exactly what `viper train` feeds the policy (RecordProcessor.prompt: images first in the
user turn, then the task's training prompt, or an instruct record's own `prompt`, then the generation
prompt `<|im_start|>assistant\\n`). The answer is what the model should write there:

  caption_refine / visual_ops  <think>{think}</think><answer>{truth sentences}</answer> (the paper's
                               "+ Viper10K SFT" baseline: the ground truth in the answer format)
  instruct                     the record's `answer`

followed by `<|im_end|>`. Answer tokens are the answer text tokenized on its own (no special tokens
added) plus that `<|im_end|>`: the loss covers them and nothing else. An instruct record's `answer_focus`
character spans mark its focus tokens (those a span overlaps): `focus_mask`, for sft.focus_steps.

Batches reuse the GRPO pipeline's Collator: rows are LEFT-padded to the smallest length bucket holding
the longest prompt + answer, so each row's answer is its last `answer_length` positions. `loss_mask`
marks those target positions (never padding, prompt or image pads).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from viper_common import records
from viper_jax.data.processing import Collator, Example, RecordProcessor, Skipped

IM_END = "<|im_end|>"


def viper_answer(truth: Sequence[str], think: str = "", joiner: str = "\n") -> str:
    """The answer-format response whose answer is the record's ground-truth sentences."""
    return f"<think>{think}</think><answer>{joiner.join(truth)}</answer>"


@dataclasses.dataclass
class SFTExample(Example):
    """input_ids: prompt (image pads expanded) + answer + <|im_end|>; the answer is the last `answer_length`."""

    answer_length: int = 0
    answer_focus: np.ndarray | None = None  # [answer_length] bool: the token overlaps an answer_focus span


class SFTProcessor(RecordProcessor):
    """Encoded record -> SFTExample, or Skipped: RecordProcessor's reasons, `bad_answer` for an answer
    holding special tokens (vision placeholders or chat markers would corrupt the sequence), and
    `too_long` when prompt + answer exceed the largest length bucket."""

    def __init__(self, tokenizer: Any, image_processor: Any, prompts: Mapping[str, str], max_length: int,
                 think: str = "", truth_joiner: str = "\n"):
        super().__init__(tokenizer, image_processor, prompts, max_length)
        self.think, self.truth_joiner = think, truth_joiner
        self.im_end = int(tokenizer.convert_tokens_to_ids(IM_END))
        self.special = np.asarray(sorted(set(tokenizer.all_special_ids) | {self.image_id, self.video_id,
                                                                             self.tokens.start, self.tokens.end}))

    def answer_text(self, record: records.ViperRecord) -> str:
        if record.task == records.INSTRUCT:
            return record.answer
        return viper_answer(record.truth, self.think, self.truth_joiner)

    def __call__(self, data: bytes) -> SFTExample | Skipped:
        record = self.decode(data)
        if isinstance(record, Skipped):
            return record
        text = self.answer_text(record)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(record.answer_focus))
        answer = np.asarray(encoded["input_ids"], np.int32)
        if np.isin(answer, self.special).any():
            return Skipped("bad_answer", record.id, "the answer holds special tokens: "
                           f"{self.tokenizer.convert_ids_to_tokens(answer[np.isin(answer, self.special)].tolist())}")
        prompt = self.prompt(record)
        if isinstance(prompt, Skipped):
            return prompt
        ids = np.concatenate([prompt.input_ids, answer, np.asarray([self.im_end], np.int32)])
        if len(ids) > self.max_length:
            return Skipped("too_long", record.id, f"prompt + answer is {len(ids)} tokens "
                                                  f"({len(prompt.input_ids)} + {len(answer) + 1}), "
                                                  f"largest bucket {self.max_length}")
        return SFTExample(id=record.id, task=record.task, truth=record.truth, input_ids=ids,
                          pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                          answer_length=len(answer) + 1,
                          answer_focus=focus_tokens(encoded.get("offset_mapping"), record.answer_focus, len(answer) + 1))


def focus_tokens(offsets: Sequence[tuple[int, int]] | None, spans: Sequence[tuple[int, int]], length: int) -> np.ndarray:
    """[length] bool: token k's character range [a, b) overlaps a span (a byte-level token " red" holds
    its leading space, so overlap rather than containment). The closing <|im_end|> is never a focus token."""
    focus = np.zeros(length, bool)
    if spans:
        a, b = np.asarray(offsets, np.int64).reshape(-1, 2).T
        for s, e in spans:
            focus[:len(a)] |= (a < e) & (b > s)
    return focus


@dataclasses.dataclass(frozen=True)
class SFTCollator(Collator):
    """Collator's batch (`prompt_lengths` then holds the whole sequence's length) plus
    `answer_lengths` [B], `loss_mask` [B, T] int32: 1 where a row's answer token sits, and `focus_mask`
    [B, T] int32: 1 where a focus token sits (a subset of loss_mask)."""

    def __call__(self, examples: Sequence[SFTExample]) -> dict[str, Any]:
        batch = super().__call__(examples)
        answer = np.asarray([e.answer_length for e in examples], np.int32)
        width = batch["input_ids"].shape[1]
        batch["answer_lengths"] = answer
        batch["loss_mask"] = (np.arange(width)[None, :] >= width - answer[:, None]).astype(np.int32)
        focus = np.zeros_like(batch["loss_mask"])
        for row, e in enumerate(examples):
            if e.answer_focus is not None and e.answer_length:
                focus[row, width - e.answer_length:] = e.answer_focus
        batch["focus_mask"] = focus
        return batch
