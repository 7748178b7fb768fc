"""Synthesis in ShapeWorld on the CPU: the world's base VLM does every VLM step, the simulated text-to-image
model and editor (synthesis_torch/shapeworld_sim.py) stand in for Qwen-Image and Qwen-Image-Edit.

    viper-synth caption-refine --images IMAGES --out OUT --config configs/synth_shapeworld.py
    viper-synth visual-ops --records OUT --out OUT --config configs/synth_shapeworld.py

IMAGES holds ShapeWorld PNGs (viper_common.shapeworld.render.render_png: the scene rides in the metadata,
which only the simulators read). The VLM is an HF directory from $VIPER_SHAPEWORLD_VLM (default
/tmp/shapeworld/base_hf, what `viper world base` exports).
"""

import os

from synthesis_torch.config import default_config
from viper_common.shapeworld.edit_skills import EDIT_PROMPT


def get_config():
    c = default_config()
    c.models.vlm = os.environ.get("VIPER_SHAPEWORLD_VLM", "/tmp/shapeworld/base_hf")
    c.models.t2i = c.models.editor = "shapeworld"  # recorded as the model names; the simulators load nothing
    c.t2i.name = c.editor.name = "shapeworld"
    c.device, c.dtype = "cpu", "float32"
    c.chunk_size = 16

    # A tiny VLM and short world sentences: small batches of short generations. The images are 112 px, so
    # the processor's own range (0 = keep the exported directory's setting) gives 16 visual tokens each.
    c.vlm.batch_size = 8
    c.vlm.max_new_tokens_caption = 160
    c.vlm.max_new_tokens_critique = 128
    c.vlm.max_new_tokens_edit = 96
    c.vlm.max_new_tokens_refine = 160  # a caption's length
    c.vlm.min_pixels = c.vlm.max_pixels = 0
    # Greedy captions of base9 loop without it ("A medium pale yellow striped triangle. A medium pale yellow filled
    # cross. ..." to the 160-token limit, 6 of 6 round-0 source images; so do 1.05's); at 1.2 they end, after
    # 98-112 tokens, and name the objects' hues, sizes and patterns (run rq13, docs/shapeworld.md).
    c.vlm.repetition_penalty = 1.2

    c.inputs.min_side = 64  # ShapeWorld images are 112 px (the default 128 is for photos)

    # Strict parsing. The world's sentences are short ("Remove the red star." has 4 words, "The circle is
    # dark blue." 5), so the word minimums are 3; a one-object caption has about 8 words.
    c.filter.lenient = False
    c.filter.min_words = 3
    # The world base lists differences for its own compare prompt ("- " lines, world.compare_lists) but writes
    # nothing for the photo-critique wording with the caption inside (run rq6: 24 of 24 empty). Shown the original
    # and its redrawing, the differences are what the caption got wrong or left out.
    c.prompts.critique = "List the differences between the two images, one per line starting with '- '."
    # Stage 2 asks for edits of the named objects in the world's wording, with the image and without the
    # description (base_data kind "edit": the request the base was taught; base6, never taught it, wrote nothing).
    c.prompts.edit_instructions = EDIT_PROMPT
    c.filter.min_caption_words = 5
    c.filter.max_chars = 200
    c.ops.min_words = 3
    c.ops.num_ops = 2
    # The VLM checks every edit that changed enough pixels (the simulated editor sometimes edits another
    # object: the band cannot tell, the before/after images can).
    c.ops.verify = True
    c.vlm.max_new_tokens_verify = 24  # the base answers <think>...</think><answer>Yes.</answer>

    # The simulated editor: how often it fails, and how a failure looks (see shapeworld_sim.py).
    c.editor.failure_rate = 0.15
    c.editor.wrong_object_share = 0.5
    # The world base's instructions name objects loosely ("the medium light yellow cross" for a large light
    # yellow one; run rq7: 24 of 24 edits not understood with exact references); a real editor acts on the
    # closest match, so the simulated one does too.
    c.editor.closest_match = True

    # Difference band, measured on 700 random edits of 100 random scenes (the simulated editor re-renders
    # untouched pixels exactly, so "no change" is exactly 0): changed_fraction with pixel_threshold 0.05
    # was 0.0006 .. 0.066 for attribute edits, 0.0011 .. 0.0069 for label (text) edits, up to 0.25 for count
    # edits. At the default threshold 0.1 a few visible edits read as 0 (light gray on silver differs by
    # about 0.09 per channel), hence 0.05.
    c.diff.pixel_threshold = 0.05
    c.diff.min = 0.0004
    c.diff.max = 0.5
    return c
