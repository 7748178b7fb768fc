"""How good is the truth a world model synthesised for stage 1, and what could a perfect policy earn against it?

Stage 1's truth is the VLM's own list of what its caption got wrong (its critique of the original against the
reconstruction). GRPO can only teach perception if an answer that describes the image well earns more reward
than one that does not. This probe reads a run's caption_refine shards and, for evaluation only, the scene each
source image carries in its metadata (the learner never sees it), and prints:

  truth facts       per truth sentence, the facts it states (fact_match.facts) and the share whose facts agree
                    with some object of the image: every stated hue, shade, size, pattern, label and cell is that
                    object's, and one of the stated shapes is (a critique may name the wrong shape and the right
                    one); and the share per field of sentences stating it whose value some object at the stated
                    cell has; the same agreement with another record's image (what chance gives), and the
                    captions' sentences checked the same way
  reward ceilings   the reward's correctness term (viper_jax/rl/reward.py, `--matcher` and `--tau` as in
                    training) of three answers to every record: the truth itself (a check: 1), an oracle that
                    writes one caption sentence per object of the true scene, and the record's caption copied;
                    with each answer's best sentence similarity to a truth sentence

    python scripts/world_truth_probe.py --synth runs/rq16/viper_seed0/round_000/synth [--matcher shapeworld]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from viper_common import records
from viper_common.prompts import reasoning_response
from viper_common.shapeworld import language
from viper_common.shapeworld.fact_match import facts
from viper_common.shapeworld.render import read_scene
from viper_common.shapeworld.scene import Obj, Scene
from viper_jax.rl.reward import ViperReward, split_sentences

SINGLE_FIELDS = ("hue", "shade", "size", "pattern", "label", "cell")  # one value per object, checked by agrees
FIELDS = ("hue", "shape", "size", "shade", "pattern")  # the per-field columns


def stated(sentence: str) -> dict[str, set[str]]:
    """field -> the values a sentence states for it (fact_match's canonical tokens)."""
    out: dict[str, set[str]] = {}
    for fact in facts(sentence):
        field, value = fact.split("=", 1)
        out.setdefault(field, set()).add(value)
    return out


def agrees(obj: Obj, said: dict[str, set[str]]) -> bool:
    if "shape" in said and obj.shape not in said["shape"]:
        return False
    return all(str(getattr(obj, f)) in said[f] for f in SINGLE_FIELDS if f in said)


class Tally:
    """Per sentence: its fact count, whether some object agrees with all its facts, and per field whether an
    object at the stated cell has a stated value."""

    def __init__(self):
        self.n_facts, self.agree, self.fields = [], [], {f: [] for f in FIELDS}

    def add(self, sentence: str, scene: Scene) -> None:
        said = stated(sentence)
        if not said:
            return
        self.n_facts.append(sum(len(v) for v in said.values()))
        self.agree.append(any(agrees(o, said) for o in scene.objects))
        cells = {int(c) for c in said.get("cell", ())}
        at = [o for o in scene.objects if not cells or o.cell in cells]
        for field in FIELDS:
            if field in said:
                self.fields[field].append(any(str(getattr(o, field)) in said[field] for o in at))

    def row(self, name: str) -> str:
        cells = [f"{np.mean(v):.0%} (n={len(v)})" if v else "-" for v in self.fields.values()]
        return (f"| {name} | {len(self.agree)} | {np.mean(self.n_facts):.1f} | {np.mean(self.agree):.0%} | "
                + " | ".join(cells) + " |")


def oracle_answer(scene: Scene, seed: int) -> str:
    rng = np.random.default_rng(seed)
    sentences = [language.object_sentence(obj, rng) for obj in scene.objects]
    return reasoning_response("I look at each object in turn.", " ".join(sentences))


def load(synth: Path) -> list[tuple[records.ViperRecord, Scene]]:
    paths = sorted(synth.glob("caption_refine-*/part-*.arrayrecord")) or sorted(synth.glob("part-*.arrayrecord"))
    if not paths:
        sys.exit(f"error: no caption_refine part-*.arrayrecord under {synth}")
    out = []
    for path in paths:
        for i, data in enumerate(records.read_shard(path)):
            rec = records.decode(data)
            scene = read_scene(rec.images[0])
            if scene is None:
                sys.exit(f"error: {path} record {i} ({rec.id}): its image carries no ShapeWorld scene")
            out.append((rec, scene))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synth", required=True, type=Path, help="a synth dir holding caption_refine-* shard dirs")
    p.add_argument("--matcher", default="shapeworld", choices=("shapeworld", "embedding"))
    p.add_argument("--tau", type=float, default=0.85)
    args = p.parse_args()
    data = load(args.synth)

    truth = Tally()
    caption = Tally()
    chance = []
    for k, (rec, scene) in enumerate(data):
        other = data[(k + 1) % len(data)][1]  # another record's image: the agreement chance alone gives
        for sentence in (s for t in rec.truth for s in split_sentences(t)):
            truth.add(sentence, scene)
            chance.append(any(agrees(o, stated(sentence)) for o in other.objects))
        for sentence in split_sentences(rec.caption or ""):
            caption.add(sentence, scene)
    print(f"{len(data)} records; with another record's image, truth sentences consistent: {np.mean(chance):.0%}")
    print(f"| sentences | n | facts each | consistent with some object | "
          + " | ".join(f"{f} right" for f in FIELDS) + " |\n|---|---|---|---|" + "---|" * len(FIELDS))
    for name, tally in (("truth", truth), ("caption", caption)):
        print(tally.row(name))

    reward = ViperReward(dict(matcher=args.matcher, tau=args.tau))
    truths = [list(rec.truth) for rec, _ in data]
    answers = {"the truth itself": [reasoning_response("I check.", " ".join(t)) for t in truths],
               "oracle: one sentence per true object": [oracle_answer(s, i) for i, (_, s) in enumerate(data)],
               "the caption, copied": [reasoning_response("I check.", rec.caption or "") for rec, _ in data]}
    print(f"\n| answer | correctness ({args.matcher}, tau {args.tau}) | records with any hit | "
          f"best sentence similarity, mean |\n|---|---|---|---|")
    for name, texts in answers.items():
        out = reward(texts, truths)
        best = [float(np.max(reward.sentence_similarity(split_sentences(reward.answer_text(a)[1]),
                                                        split_sentences(" ".join(t))))) for a, t in zip(texts, truths)]
        print(f"| {name} | {out.correctness.mean():.3f} | {np.mean(out.hits > 0):.0%} | {np.mean(best):.2f} |")


if __name__ == "__main__":
    main()
