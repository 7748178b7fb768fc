"""Synthesis configuration: an ml_collections `ConfigDict`, overridable from the command line.

The defaults live here (not only in `configs/synth_default.py`) so that an installed package works without
the repository's `configs/` folder; `configs/synth_default.py` returns exactly `default_config()` and is
the file to copy and edit. `--config path.py` loads any file with `get_config()`, and each
`--config.a.b=value` flag then overrides one existing field, type-checked against the default (a typo is
an error, not a silently ignored setting).
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from viper_common import config_overrides

from viper_common.prompts import SYNTHESIS_PROMPTS

# The editor operation taxonomy (viper_method.md, stage 2; our choice of taxonomy).
OP_TYPES = ("attribute", "add", "remove", "replace", "move", "count", "text")


def default_config() -> ml_collections.ConfigDict:
    """Settings for the real models on a GPU (Qwen2.5-VL-7B-Instruct, Qwen-Image, Qwen-Image-Edit)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # base seed; every per-image seed is derived from it and the image's stable id
    c.device = "auto"  # "auto" = cuda if available, else cpu
    c.dtype = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu; or "bfloat16" / "float16" / "float32"
    c.chunk_size = 64  # inputs per part shard: a kill loses at most one chunk of work

    # Model directories (anything `from_pretrained` accepts: a local path, or a hub id when online).
    c.models = ml_collections.ConfigDict()
    c.models.vlm = "Qwen/Qwen2.5-VL-7B-Instruct"
    c.models.t2i = "Qwen/Qwen-Image"
    c.models.editor = "Qwen/Qwen-Image-Edit"

    c.vlm = ml_collections.ConfigDict()
    c.vlm.batch_size = 8
    c.vlm.max_new_tokens_caption = 512
    c.vlm.max_new_tokens_critique = 384
    c.vlm.max_new_tokens_edit = 256
    c.vlm.max_new_tokens_refine = 512
    c.vlm.max_new_tokens_verify = 16  # stage 2's yes/no check of an edit (ops.verify)
    c.vlm.temperature = 0.0  # 0 = greedy: deterministic whatever the batching; > 0 samples (seeded per batch)
    c.vlm.top_p = 1.0
    c.vlm.repetition_penalty = 1.05  # Qwen2.5-VL's own generation_config value; avoids list loops
    c.vlm.min_pixels = 256 * 28 * 28  # processor resize range; 0 keeps the processor's saved setting
    c.vlm.max_pixels = 1280 * 28 * 28
    c.vlm.attn_implementation = "sdpa"
    c.vlm.show_image_for_edits = True  # stage 2: show the image with the description when asking for edits
    # Stage 1's refined description (stage 2 picks its hard entities from it): True = the VLM, shown the image,
    # rewrites the caption with its corrections into one description (prompt "refine"); False = the caption
    # with the corrections appended. An unusable rewrite falls back to the latter (counted: refine_fallback).
    c.vlm.rewrite_refined = True

    # Stage-1 reconstruction (text-to-image from the caption alone).
    c.t2i = ml_collections.ConfigDict()
    c.t2i.name = "qwen_image"  # key in synthesis_torch.diffusion.RECONSTRUCTORS
    c.t2i.plugin = ""  # module imported first, so that it can register_reconstructor() another model
    c.t2i.steps = 50
    c.t2i.true_cfg_scale = 4.0
    c.t2i.negative_prompt = " "  # Qwen-Image enables true CFG only with a negative prompt
    c.t2i.area = 1024 * 1024  # output pixels; the aspect ratio follows the original image
    c.t2i.batch_size = 1  # prompts per pipeline call (only same-size images are batched)
    c.t2i.max_sequence_length = 512  # caption tokens the text encoder sees (the pipeline allows <= 1024)
    c.t2i.offload = "model"  # "none" | "model" (enable_model_cpu_offload) | "sequential"; GPU only

    c.editor = ml_collections.ConfigDict()
    c.editor.name = "qwen_image_edit"  # key in synthesis_torch.editors.EDITORS
    c.editor.steps = 50
    c.editor.true_cfg_scale = 4.0
    c.editor.negative_prompt = " "
    c.editor.area = 1024 * 1024  # output pixels, aspect ratio of the input
    # Pixels at which the pipeline conditions on the input image. 0 keeps the pipeline's own 1024*1024;
    # the tiny CPU demo lowers it (see editors.py: the pipeline hard-codes this area).
    c.editor.condition_area = 0
    c.editor.mode = "sequential"  # "sequential": one edit call per operation | "combined": one call for all
    c.editor.offload = "model"
    c.editor.plugin = ""  # module imported first, so that it can register_editor() another editor
    # A simulated editor's failures (shapeworld_sim.py; real editors fail on their own): this share of edits
    # fails, a failure applying the edit to another object with share wrong_object_share, else not at all.
    c.editor.failure_rate = 0.0
    c.editor.wrong_object_share = 0.5
    c.editor.closest_match = False  # the simulated editor: a loose object reference goes to the closest object

    # Input images (stage 1).
    c.inputs = ml_collections.ConfigDict()
    c.inputs.extensions = "jpg,jpeg,png,webp"
    c.inputs.min_side = 128  # shorter side below this: rejected as "too_small"
    c.inputs.max_pixels = 40_000_000  # above this: rejected as "too_large" (checked from the header)
    c.inputs.max_aspect = 8.0  # long/short side above this: "bad_aspect" (panoramas reconstruct badly)
    c.inputs.max_bytes = 50_000_000

    # Parsing and filtering of model outputs (see parsing.py).
    c.filter = ml_collections.ConfigDict()
    # lenient=True accepts ANY non-empty line as a sentence / an edit operation of type "unspecified".
    # It exists only so tiny random-init models (which emit gibberish) still produce records for tests
    # and the CPU demo; never use it with real models.
    c.filter.lenient = False
    c.filter.min_words = 3
    c.filter.max_chars = 300
    c.filter.min_alpha_ratio = 0.7  # letters and spaces / characters; rejects code, numbers, garbage
    c.filter.max_corrections = 8
    c.filter.min_caption_words = 8

    # Stage 2: entity selection and edit operations (see entities.py and parsing.py).
    c.ops = ml_collections.ConfigDict()
    c.ops.num_ops = 2  # instructions asked for per image
    c.ops.max_entities = 4
    c.ops.min_entity_score = 2
    c.ops.types = ",".join(OP_TYPES)
    c.ops.min_words = 3
    # Used as the entity list when the rules find none. Empty (default) = reject "no_entities".
    # The tiny demo sets it because gibberish descriptions contain no noun phrases.
    c.ops.fallback_entities = ""
    # The VLM checks each edit that passed the difference band: shown the image before and after it, does
    # the edited image show the instruction's result (prompt "verify_edit", a yes/no answer; anything but
    # "yes" is a no)? Sequential mode: an edit it denies is dropped (op_not_verified) and its output
    # discarded; combined mode, and sequential with every edit denied: the sample is rejected
    # (edit_not_verified). Off by default (a real editor's output is trusted); on in configs/synth_shapeworld.py.
    c.ops.verify = False

    # Difference band (see diffband.py for the measures and the values they take).
    c.diff = ml_collections.ConfigDict()
    c.diff.size = 256  # both images are box-resized to size x size before comparing
    c.diff.pixel_threshold = 0.1  # a pixel counts as changed when its mean |diff| exceeds this
    c.diff.metric = "changed_fraction"  # or "mean_abs"
    c.diff.min = 0.002  # below: the edit changed (almost) nothing
    c.diff.max = 0.7  # above: the edit changed (almost) everything
    c.diff.per_op = True  # sequential mode: drop operations that changed nothing, reject on a blow-up

    c.prompts = ml_collections.ConfigDict(dict(SYNTHESIS_PROMPTS))
    return c


def tiny_config(vlm: str, t2i: str, editor: str) -> ml_collections.ConfigDict:
    """Settings for the tiny random-init components of `tiny_models.py` (tests, CPU demo)."""
    c = default_config()
    c.models.vlm, c.models.t2i, c.models.editor = vlm, t2i, editor
    c.device, c.dtype = "cpu", "float32"
    c.chunk_size = 2
    c.vlm.batch_size = 4
    c.vlm.max_new_tokens_caption = c.vlm.max_new_tokens_critique = c.vlm.max_new_tokens_edit = 24
    c.vlm.max_new_tokens_refine = 24
    c.vlm.min_pixels, c.vlm.max_pixels = 0, 0  # keep the tiny processor's small saved range
    c.t2i.steps = c.editor.steps = 2
    c.t2i.true_cfg_scale = c.editor.true_cfg_scale = 1.0  # no CFG: half the work
    c.t2i.area = c.editor.area = 32 * 32
    c.t2i.max_sequence_length = 64
    c.t2i.offload = c.editor.offload = "none"
    c.editor.condition_area = 32 * 32
    c.inputs.min_side = 24
    c.filter.lenient = True  # random weights emit gibberish: see the `filter.lenient` comment above
    c.ops.num_ops = 1
    c.ops.fallback_entities = "the main object"
    c.diff.min, c.diff.max = 0.0, 1.0  # random editors change everything: the band is opened fully
    return c


def load_config(path: str | None) -> ml_collections.ConfigDict:
    """`get_config()` of a Python file (every key must exist in `default_config()`), or `default_config()`
    when path is None."""
    if not path:
        return default_config()
    return config_overrides.load_config_file(path, default_config())


def apply_overrides(config: ml_collections.ConfigDict, flags: Sequence[str]) -> list[str]:
    """Applies `--config.a.b=value` / `--config.a.b value` flags; returns the arguments it did not use."""
    return config_overrides.apply_overrides(config, flags, allow_other=True)


def csv(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(p.strip().lower() for p in text.split(",") if p.strip())
