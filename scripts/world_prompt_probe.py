"""Does a world model answer ViPER's stage-1 prompt at all? GRPO learns only from groups whose rewards differ.

The policy's stage-1 prompt (TRAINING_PROMPTS["caption_refine"]) quotes a whole description of the image and asks
for corrections in the reasoning format. A base that answers it with an empty block in every sample gives every
group zero reward spread, and GRPO's update is exactly zero (runs rq12-rq14, docs/shapeworld.md). This probe
samples the prompt on images of the `synth` seed range (the loop's sources; from the range's end, which the quick
loop does not reach), each quoting a caption in the world's grammar (a correct one: the probe measures the form
of the answers, not their truth), and prints per model:

  format       share of samples that match the format reward's regex (after a cut at the first `</answer>`, as
               the rollout's stop string does)
  answered     share of samples whose answer block holds at least one sentence
  format spread  share of groups (one image's samples) in which the format reward differs: a signal for GRPO
  sentences    mean answer sentences per sample; tokens: mean response tokens

    python scripts/world_prompt_probe.py --model assets/world_base --model runs/base10/base_hf [--images 8]
"""

from __future__ import annotations

import argparse
import io
import re

import numpy as np
from PIL import Image

from viper_common.prompts import TRAINING_PROMPTS
from viper_common.shapeworld import language, render
from viper_common.shapeworld.scene import sample_scene
from viper_common.shapeworld.splits import SEED_RANGES
from viper_jax import inference
from viper_jax.rl.reward import DEFAULT_FORMAT_REGEX, split_sentences

FORMAT = re.compile(DEFAULT_FORMAT_REGEX, re.DOTALL)
STOP = "</answer>"


def prompts(n: int, size: int) -> list[tuple[Image.Image, str]]:
    start = SEED_RANGES["synth"].stop - n
    out = []
    for seed in range(start, start + n):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng)
        image = Image.open(io.BytesIO(render.render_png(scene, seed, size))).convert("RGB")
        out.append((image, TRAINING_PROMPTS["caption_refine"].format(caption=language.caption(scene, rng))))
    return out


def probe(model: str, n: int, samples: int, size: int, max_new_tokens: int, seed: int) -> dict[str, float]:
    session = inference.load_session(model, min_pixels=size * size, max_pixels=size * size)
    built = [session.prompt([image], text) for image, text in prompts(n, size)]
    longest = max(len(p.input_ids) for p in built)
    cfg = inference.rollout_config(session, max_new_tokens, (longest,), samples, temperature=1.0)
    result = inference.generate_batch(session, built, cfg, seed)
    texts = [session.decode(result.tokens[r], result.lengths[r]) for r in range(len(result.tokens))]
    cut = [t.split(STOP, 1)[0] + STOP if STOP in t else t for t in texts]
    matches = [FORMAT.fullmatch(t) for t in cut]
    fmt = np.array([m is not None for m in matches], float).reshape(n, samples)
    sentences = np.array([len(split_sentences(m.group("answer"))) if m else 0 for m in matches], float)
    for t in texts[:3]:
        print(f"  e.g. {t[:200]!r}")
    return {"format": fmt.mean(), "answered": float((sentences > 0).mean()),
            "format spread": float((fmt.min(1) != fmt.max(1)).mean()), "sentences": sentences.mean(),
            "tokens": float(np.mean(result.lengths)), "prompt tokens": float(longest)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="HF directory (repeat to compare)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--samples", type=int, default=6, help="samples per image at temperature 1 (a GRPO group)")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = {}
    for model in args.model:
        print(model)
        rows[model] = probe(model, args.images, args.samples, args.size, args.max_new_tokens, args.seed)
    keys = list(next(iter(rows.values())))
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for model, row in rows.items():
        print(f"| {model} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
