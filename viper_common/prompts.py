"""Every prompt ViPER uses, in one place: the training prompts (what the policy sees during GRPO) and
the synthesis prompts (what the synthesising VLM is asked). Configs override any entry by key
(`config.prompts.<key>`), so a user changes wording without touching code.

The paper's exact prompts are not published; these are our wording (see shared/reference/viper_method.md).
"""

from __future__ import annotations

# Expected response structure for the format reward: reasoning block, then an answer block whose
# sentences are scored against the ground truth.
RESPONSE_FORMAT = (
    "First think about the question inside <think> </think> tags, then give your final answer inside "
    "<answer> </answer> tags, one short sentence per item."
)


def reasoning_response(think: str, answer: str) -> str:
    """A response in RESPONSE_FORMAT's structure (what the format reward's default regex matches)."""
    return f"<think>{think}</think><answer>{answer}</answer>"

TRAINING_PROMPTS: dict[str, str] = {
    # Stage 1, caption self-refining: image + a caption that has errors and omissions.
    "caption_refine": (
        "Here is a description of the image:\n\"{caption}\"\n"
        "The description contains mistakes and leaves out details. Look at the image carefully and list "
        "every correction or missing detail about objects, attributes, text and spatial relations. "
        + RESPONSE_FORMAT
    ),
    # Stage 2, visual-operation predicting: original image, then the edited image.
    "visual_ops": (
        "The first image is the original and the second image is an edited version of it. List every "
        "editing operation (attribute change, addition, removal, replacement, movement, count change or "
        "text change) that turns the first image into the second. " + RESPONSE_FORMAT
    ),
}

SYNTHESIS_PROMPTS: dict[str, str] = {
    # Stage 1 step 1: the VLM's own detailed caption C_g of the image.
    "caption": (
        "Describe this image in detail: every object with its colour, material, size and position, any "
        "visible text, and how the objects relate to each other in space. Write one paragraph."
    ),
    # Stage 1 step 3: shown the original, the reconstruction from C_g, and C_g itself.
    "critique": (
        "The first image is a real photograph. The second image was generated from this description "
        "alone:\n\"{caption}\"\nCompare the two images. List what the description got wrong or left out "
        "about the real photograph (object attributes, text, spatial relations), one correction per line, "
        "each line starting with '- '. Write only the list."
    ),
    # Stage 1 step 4 (synthesis `vlm.rewrite_refined`): shown the original image, the VLM rewrites its
    # caption with the corrections it found into one refined description, stage 2's input text.
    "refine": (
        "Here is a description of the image:\n\"{caption}\"\nComparing it with the image showed these errors "
        "and omissions:\n{corrections}\nRewrite the description into one refined description of the image: "
        "apply every correction, keep what was right and add what was missing. Write one paragraph and "
        "nothing else."
    ),
    # Stage 2: edit instructions of typed operations for selected hard entities.
    "edit_instructions": (
        "Here is a detailed description of an image:\n\"{description}\"\n"
        "Write {num_ops} image editing instruction(s) that change these entities: {entities}. "
        "Each line has the form '<type>: <instruction>' where <type> is one of attribute, add, remove, "
        "replace, move, count, text. Write only the lines."
    ),
    # Stage 2's check of an edit (synthesis `ops.verify`): the image before the edit, then after it. Ends as
    # the yes/no questions the ShapeWorld base model was trained on do.
    "verify_edit": (
        "The first image is the original and the second image is the result of this editing instruction:\n"
        "\"{instruction}\"\nDoes the second image show the result of the instruction, applied to the first "
        "image? Please answer yes or no."
    ),
}


def merged(base: dict[str, str], overrides: dict[str, str] | None) -> dict[str, str]:
    """`base` with config overrides applied; an unknown key is an error (typos must not pass silently)."""
    out = dict(base)
    for key, value in (overrides or {}).items():
        if key not in base:
            raise KeyError(f"unknown prompt key {key!r}; known: {sorted(base)}")
        out[key] = value
    return out
