"""Per-record processing (bytes -> model inputs) and batch collation, as plain NumPy/PIL code.

`RecordProcessor` runs inside Grain's `map` (possibly in worker processes) and never raises for a bad
record: it returns a `Skipped` sentinel instead, so the pipeline can count and log it in the main
process and the iterator state stays exact (one source index in, one element out).

Token layout follows `Qwen2_5_VLProcessor` exactly: the chat template emits one
`<|vision_start|><|image_pad|><|vision_end|>` per image; each `<|image_pad|>` is then expanded into
`grid.prod() // merge_size**2` copies. We expand at the id level (tokenize once, then `np.repeat`),
which equals the processor's string-level expansion because special tokens are atomic in the
tokenizer; tests/test_data_pipeline.py checks this against the processor itself.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from viper_common import records
from viper_common.image_checks import check_usable
from viper_jax.data.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# mm_token_type_ids values (transformers' convention for Qwen2.5-VL).
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@dataclasses.dataclass
class Example:
    """One processed record. `input_ids` are unpadded; `pixel_values` rows are in processor order."""

    id: str
    task: str
    truth: tuple[str, ...]
    input_ids: np.ndarray       # [L] int32, image pads already expanded
    pixel_values: np.ndarray    # [sum_i grid_i.prod(), C*T*P*P] float32
    image_grid_thw: np.ndarray  # [num_images, 3] int32


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a record that cannot be used; `reason` is the counter key."""

    reason: str
    record_id: str | None
    message: str


def render_prompt(template: str, record: records.ViperRecord) -> str:
    """The task prompt for a record. Only `{caption}` is substituted, by plain replacement rather than
    `str.format`, so a user's prompt override may contain other literal braces."""
    return template.replace("{caption}", record.caption or "")


def _open_image(data: bytes) -> Any:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # PIL decodes lazily; force it here so truncated/corrupt data fails now, inside the try
    check_usable(img)  # 16-bit or animated: the image processor's RGB conversion would read it wrongly
    return img  # mode conversion is left to the image processor (do_convert_rgb), exactly as transformers


class PromptError(ValueError):
    """`build_prompt` could not build a prompt; `reason` is `bad_image` (the image processor failed)
    or `bad_prompt` (the text breaks the template, or holds vision tokens of its own)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class VisionTokens:
    image: int
    video: int
    start: int
    end: int


class Prompt(NamedTuple):
    input_ids: np.ndarray       # [L] int32, image pads expanded
    pixel_values: np.ndarray    # [sum_i grid_i.prod(), C*T*P*P] float32 ([0, 0] without images)
    image_grid_thw: np.ndarray  # [num_images, 3] int32


def vision_tokens(tokenizer: Any) -> VisionTokens:
    """The Qwen2-VL vision token ids; ValueError for a tokenizer without them or without a chat template."""
    ids = tokenizer.convert_tokens_to_ids([IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks Qwen2-VL vision tokens: {dict(zip([IMAGE_PAD, VIDEO_PAD], ids))}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template (Qwen2-VL's is in viper_common.tiny_tokenizer)")
    return VisionTokens(*(int(i) for i in ids))


def chat_prompt_ids(tokenizer: Any, num_images: int, text: str) -> np.ndarray:
    """Token ids of a one-turn user chat (images first, then `text`) with the generation prompt, holding
    ONE `<|image_pad|>` per image (not yet expanded)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    chat = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    # The template already holds every special token; add_special_tokens=False keeps a tokenizer that
    # adds BOS from adding a second one (Qwen's adds none, so this matches the processor).
    return np.asarray(tokenizer(chat, add_special_tokens=False)["input_ids"], np.int32)


def build_prompt(tokenizer: Any, image_processor: Any, images: Sequence[Any], text: str,
                 tokens: VisionTokens | None = None) -> Prompt:
    """PIL images + user text -> model inputs, exactly as `Qwen2_5_VLProcessor` on the chat-templated text.

    Raises `PromptError` (reason `bad_image` or `bad_prompt`). `tokens`: `vision_tokens(tokenizer)`,
    passed by callers that build many prompts.
    """
    tokens = tokens or vision_tokens(tokenizer)
    if images:
        try:
            out = image_processor(images=list(images), return_tensors="np")
        except Exception as e:  # noqa: BLE001 - any failure resizing/normalising an image means a bad image
            raise PromptError("bad_image", f"{type(e).__name__}: {e}") from e
        pixel_values = np.asarray(out["pixel_values"], np.float32)
        grid = np.asarray(out["image_grid_thw"], np.int32).reshape(-1, 3)
    else:
        pixel_values, grid = np.zeros((0, 0), np.float32), np.zeros((0, 3), np.int32)
    try:
        ids = chat_prompt_ids(tokenizer, len(images), text)
    except Exception as e:  # noqa: BLE001 - the text is the only input (e.g. a lone surrogate)
        raise PromptError("bad_prompt", f"cannot build the prompt: {type(e).__name__}: {e}") from e
    n = len(images)
    counts = {tid: int((ids == tid).sum()) for tid in (tokens.image, tokens.start, tokens.end)}
    if set(counts.values()) != {n} or (ids == tokens.video).any():
        raise PromptError("bad_prompt", f"prompt has vision tokens {counts} (video {int((ids == tokens.video).sum())}) "
                                        f"for {n} image(s)")
    # Expand each <|image_pad|> into its merged-patch count, in image order (as the processor does).
    merge_length = int(image_processor.merge_size) ** 2
    repeats = np.ones(len(ids), np.int64)
    repeats[ids == tokens.image] = grid.prod(axis=1) // merge_length
    return Prompt(np.repeat(ids, repeats).astype(np.int32), pixel_values, grid)


class RecordProcessor:
    """Callable: encoded record bytes -> `Example`, or `Skipped(reason)` for a record we cannot use.

    Skip reasons: the RecordError reasons of viper_common.records (bad_magic, truncated, bad_header,
    missing_field, schema_version, bad_field, bad_image), plus `bad_image` for bytes PIL or the image
    processor cannot handle, `bad_prompt` when the prompt does not hold exactly one set of vision
    placeholders per image (e.g. a caption containing special-token text), and `too_long` when the
    prompt exceeds `max_length` (the largest length bucket). The prompt itself is `build_prompt`'s.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, prompts: Mapping[str, str], max_length: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompts = dict(prompts)
        self.max_length = int(max_length)
        self.tokens = vision_tokens(tokenizer)
        self.image_id, self.video_id = self.tokens.image, self.tokens.video

    def prompt_text(self, record: records.ViperRecord) -> str:
        """The user text: an instruct record's own prompt, else the task's training prompt."""
        if record.task == records.INSTRUCT:
            return record.prompt
        return render_prompt(self.prompts[record.task], record)

    def decode(self, data: bytes) -> records.ViperRecord | Skipped:
        try:
            return records.decode(bytes(data))
        except records.RecordError as e:
            return Skipped(e.reason, e.record_id, str(e))

    def prompt(self, record: records.ViperRecord) -> Prompt | Skipped:
        """The record's model inputs (images + user turn + generation prompt), or why it cannot have them."""
        try:
            images = [_open_image(b) for b in record.images]
        except Exception as e:  # noqa: BLE001 - any failure decoding these bytes means a bad image
            return Skipped("bad_image", record.id, f"{type(e).__name__}: {e}")
        try:
            text = self.prompt_text(record)
        except Exception as e:  # noqa: BLE001 - e.g. a task without a prompt
            return Skipped("bad_prompt", record.id, f"cannot build the prompt: {type(e).__name__}: {e}")
        try:
            return build_prompt(self.tokenizer, self.image_processor, images, text, self.tokens)
        except PromptError as e:
            return Skipped(e.reason, record.id, str(e))

    def __call__(self, data: bytes) -> Example | Skipped:
        record = self.decode(data)
        if isinstance(record, Skipped):
            return record
        prompt = self.prompt(record)
        if isinstance(prompt, Skipped):
            return prompt
        if len(prompt.input_ids) > self.max_length:
            return Skipped("too_long", record.id,
                           f"prompt is {len(prompt.input_ids)} tokens, largest bucket {self.max_length}")
        return Example(id=record.id, task=record.task, truth=record.truth, input_ids=prompt.input_ids,
                       pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)


def make_image_processor(min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """transformers' PIL-backend Qwen2-VL image processor (numpy/PIL only; no torchvision needed), resizing
    every image to between min_pixels and max_pixels."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=int(min_pixels), max_pixels=int(max_pixels))


def bucket_for(n: int, buckets: Sequence[int], grow: bool = True) -> int:
    """Smallest bucket >= n: the one choice of a padded length (collation, rollout, evaluation). Past the last
    bucket: with grow, the next multiple of the last bucket (nothing dropped); without, a ValueError."""
    buckets = sorted(int(b) for b in buckets)
    i = bisect.bisect_left(buckets, n)
    if i < len(buckets):
        return buckets[i]
    if not grow:
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {buckets[-1]}; "
                         f"raise rollout.prompt_buckets or shorten the prompt")
    last = buckets[-1]
    return -(-n // last) * last


def _object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # assigned one by one so tuples stay tuples, not a 2-D array
    for i, v in enumerate(values):
        out[i] = v
    return out


@dataclasses.dataclass(frozen=True)
class Collator:
    """Batches `Example`s into the model's input dict (Grain `batch_fn`).

    Prompts are LEFT-padded to the smallest length bucket holding the longest prompt (generation appends
    on the right, so every row's last prompt token sits at T-1). With `patch_buckets`, pixel_values gets
    zero rows appended up to a patch bucket; `num_patches` says how many rows are real, and
    image_grid_thw is unchanged, so a vision tower that derives its sequence from image_grid_thw (as
    viper_jax's does: it gathers rows through `patch_perm`) never reads the padding. A consumer that
    feeds every row must slice `pixel_values[:num_patches]` first.
    """

    length_buckets: tuple[int, ...]
    pad_id: int
    image_id: int
    video_id: int
    patch_buckets: tuple[int, ...] = ()

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        lengths = np.asarray([len(e.input_ids) for e in examples], np.int32)
        width = bucket_for(int(lengths.max()), self.length_buckets)
        input_ids = np.full((len(examples), width), self.pad_id, np.int32)
        attention_mask = np.zeros((len(examples), width), np.int32)
        for b, e in enumerate(examples):
            input_ids[b, width - len(e.input_ids):] = e.input_ids
            attention_mask[b, width - len(e.input_ids):] = 1
        mm = np.where(input_ids == self.image_id, IMAGE_TYPE, np.where(input_ids == self.video_id, VIDEO_TYPE, TEXT_TYPE))
        mm = (mm * attention_mask).astype(np.int32)  # a pad id that equals a vision id must not count
        pixel_values = np.concatenate([e.pixel_values for e in examples], axis=0)
        num_patches = pixel_values.shape[0]
        if self.patch_buckets:
            rows = bucket_for(num_patches, self.patch_buckets)
            pixel_values = np.concatenate(
                [pixel_values, np.zeros((rows - num_patches, pixel_values.shape[1]), np.float32)], axis=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm,
            "pixel_values": pixel_values,
            "image_grid_thw": np.concatenate([e.image_grid_thw for e in examples], axis=0).astype(np.int32),
            "num_patches": np.asarray(num_patches, np.int32),
            "images_per_sample": np.asarray([len(e.image_grid_thw) for e in examples], np.int32),
            "prompt_lengths": lengths,
            "id": _object_array([e.id for e in examples]),
            "task": _object_array([e.task for e in examples]),
            "truth": _object_array([tuple(e.truth) for e in examples]),
        }
