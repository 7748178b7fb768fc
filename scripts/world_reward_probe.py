"""Can the ViPER reward tell a right sentence from a wrong one in ShapeWorld? One measurement per run.

R_correct counts an answer sentence as a hit when its embedding's cosine with some truth sentence exceeds tau
(viper_jax/rl/reward.py). ShapeWorld's English has a small vocabulary in a few frames, so two sentences about
different objects may still embed close together, and then the reward pays for fluent sentences whatever they
say about the image. This probe writes, for objects of scenes drawn from the base_train seed range (never the
benchmark's), a truth sentence in the caption grammar and against it:

  paraphrase   the same object and cell in another frame and other synonyms (should hit)
  <field>      the same sentence frame with one fact changed: hue, shade, shape, size, pattern, cell (should not)
  other        another object of another scene (should not)

and prints, per kind, the mean similarity and the share above each tau, for each of the reward's matchers
(`reward.matcher`: "embedding", the cosine of the reward's sentence embeddings; "shapeworld", the Jaccard
index of the facts, viper_common/shapeworld/fact_match.py).

    python scripts/world_reward_probe.py [--n 300] [--tau 0.85,0.9,0.95] [--matchers embedding,shapeworld]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from viper_common.shapeworld import language, scene as sc
from viper_common.shapeworld.fact_match import fact_similarity
from viper_common.shapeworld.splits import SEED_RANGES
from viper_jax.rl.reward import SentenceTransformerEmbedder

CHANGES = {"hue": sc.HUES, "shade": sc.SHADES, "shape": sc.SHAPES, "size": sc.SIZES, "pattern": sc.PATTERNS,
           "cell": tuple(range(len(sc.CELLS)))}


def sentence(obj: sc.Obj, frame: int, words_seed: int) -> str:
    """One caption-grammar sentence about `obj` in frame `frame`, its synonyms drawn from `words_seed`."""
    words = np.random.default_rng(words_seed)
    desc = language.describe_object(obj, words)
    return language.frame_sentence(language._FRAMES[frame], desc, language.region_phrase(obj.cell, words))


def changed(obj: sc.Obj, field: str, rng: np.random.Generator) -> sc.Obj:
    other = [v for v in CHANGES[field] if v != getattr(obj, field)]
    return dataclasses.replace(obj, **{field: other[int(rng.integers(len(other)))]})


def pairs(n: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    rng = np.random.default_rng(seed)
    start = SEED_RANGES["base_train"].stop - n  # the range's end: base data takes seeds from its start
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in ("paraphrase", *CHANGES, "other")}
    objects = [o for i in range(n) for o in sc.sample_scene(np.random.default_rng(start + i)).objects[:1]]
    for i, obj in enumerate(objects):
        frame, words = int(rng.integers(len(language._FRAMES))), int(rng.integers(2**31))
        truth = sentence(obj, frame, words)
        other_frame = (frame + 1 + int(rng.integers(len(language._FRAMES) - 1))) % len(language._FRAMES)
        out["paraphrase"].append((truth, sentence(obj, other_frame, words + 1)))
        for field in CHANGES:
            out[field].append((truth, sentence(changed(obj, field, rng), frame, words)))
        out["other"].append((truth, sentence(objects[(i + 1) % len(objects)], frame, words)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="objects (one per scene)")
    ap.add_argument("--tau", default="0.85,0.9,0.95")
    ap.add_argument("--matchers", default="embedding,shapeworld", help="the reward's reward.matcher values to probe")
    ap.add_argument("--embedding_model", default="", help="sentence-transformers directory (default MiniLM)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    taus = [float(t) for t in args.tau.split(",")]
    rows = pairs(args.n, args.seed)
    print(f"{args.n} objects; e.g. truth: {rows['paraphrase'][0][0]!r}\n  paraphrase: {rows['paraphrase'][0][1]!r}"
          f"\n  hue changed: {rows['hue'][0][1]!r}")
    for matcher in args.matchers.split(","):
        if matcher == "shapeworld":
            def sims(ps): return np.asarray([fact_similarity([a], [b])[0, 0] for a, b in ps])
        else:
            embed = SentenceTransformerEmbedder(args.embedding_model)
            def sims(ps): return np.sum(embed([p[0] for p in ps]) * embed([p[1] for p in ps]), axis=1)
        print(f"\nreward.matcher = {matcher}\n| kind | mean similarity | " + " | ".join(f"> {t}" for t in taus)
              + " |\n|---|---|" + "---|" * len(taus))
        for kind, ps in rows.items():
            sim = sims(ps)
            print(f"| {kind} | {sim.mean():.3f} | " + " | ".join(f"{np.mean(sim > t):.0%}" for t in taus) + " |")


if __name__ == "__main__":
    main()
