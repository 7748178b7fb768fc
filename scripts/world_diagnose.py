"""Does a ShapeWorld model read its images? Two measurements on held-out (val-range) scenes, one run.

1. Open questions, answered greedily and graded against the scene (the base's own `ask` wordings, so the
   format is the one it was trained on): the hue and the shape of the object at a named position, and the
   number of objects. Chance: 1/8, 1/6, 1/5.
2. Image dependence: the same question about one centred object of 8 hues, answered up to the colour word
   ("... <answer>It is"); how far apart are the model's logits for that word (max |difference| between
   hues), and which hue wins how often; and how collapsed are the vision tower's
   features (their spread across the image's tokens, against their overall scale). A model that ignores its
   images has near-zero logit differences; a collapsed tower gives near-constant features.
3. Two-image comparison (`--compare N`; `--show K` prints K answers beside their truth): pairs made as the
   base data's compare examples are (one coarse change, same render seed), asked the base data's list
   prompt, which is also stage 1's critique prompt in configs/synth_shapeworld.py. Graded against the
   pair's true change sentence with the reward's fact matcher: a hit (Jaccard >= 0.85, the reward's tau),
   the mean Jaccard, and whether the answer names a hue of the changed object; each also against another
   pair's change (what an answer that ignores the images gets). A critique can only be better than chance
   if this is. `--same N`: N pairs, half the same render twice, half one coarse change, asked "Are these two
   images the same?" after the base's own think; right when "Yes" is likelier than "No" as the first answer
   token exactly for the unchanged pairs (chance 0.5): does the model see that anything changed at all? Also
   N/2 pairs of two unrelated scenes, the yes - no margin per kind of pair, and the AUC of same pairs
   against changed pairs (all, and per kind of change) and against other-scene pairs (the margin's ranking,
   whatever its yes/no bias).
4. Answer type (`--answer_type N`), teacher-forced: for N shape and N colour questions (as in 1), with the
   base's own think, which answer is likeliest among "It is a <shape>." (6) and "It is <hue>." (8)? The share
   whose likeliest answer has the asked type separates reading the question from reading the image (chance
   for the type: 6/14 for shape questions, 8/14 for colour ones), and "exact" counts the right value.

    python scripts/world_diagnose.py --model runs/world_base/base_hf
    python scripts/world_diagnose.py --model runs/world_base/sft/checkpoints --step 500 \
        --tokenizer_dir runs/world_base/init_model

Reads the scene graph only to grade (diagnostics may; the learner never does).
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np

from viper_common.shapeworld import base_data, language, render
from viper_common.shapeworld.fact_match import facts, fact_similarity
from viper_common.shapeworld import scene as S
from viper_common.shapeworld.splits import SEED_RANGES, seed_block
from viper_jax.evaluation.answers import answer_text
from viper_jax.evaluation.likelihood import score_row
from viper_jax.inference import add_model_args, generate_batch, rollout_config, session_from_args
from viper_jax.models.qwen2_5_vl import prepare_vision

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
ANSWER_PREFIX = "<think>I look at the center.</think><answer>It is"
QUESTIONS = {"hue": "Tell me the colour of the object at the {where}.",
             "shape": "Tell me the shape of the object at the {where}.", "count": "How many shapes can you see?"}


def open_questions(session, n: int, size: int) -> dict[str, tuple[int, int]]:
    prompts, truths = [], []
    for k, seed in enumerate(seed_block("val", 99, n * 3)):  # a block the benchmark's categories do not use
        rng = np.random.default_rng(seed)
        scene = S.sample_scene(rng)
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        kind = ("hue", "shape", "count")[k % 3]
        prompts.append(session.prompt([render.render(scene, seed, size)], QUESTIONS[kind].format(where=obj.position)))
        truths.append((kind, {"hue": obj.hue, "shape": obj.shape, "count": NUMBERS[len(scene.objects)]}[kind]))
    cfg = rollout_config(session, 32, (64, 96, 128))
    hits, totals = collections.Counter(), collections.Counter()
    for b in range(0, len(prompts), 48):
        out = generate_batch(session, prompts[b:b + 48], cfg)
        for r, (kind, want) in enumerate(truths[b:b + 48]):
            words = re.findall(r"[a-z]+", answer_text(session.decode(out.tokens[r], out.lengths[r])).lower())
            hits[kind] += want in words
            totals[kind] += 1
    return {k: (hits[k], totals[k]) for k in totals}


def _change_hues(scene: S.Scene, edited: S.Scene) -> set[str]:
    """The hues of the objects the change touched (in either image)."""
    before, after = set(scene.objects), set(edited.objects)
    return {o.hue for o in before ^ after}


def compare_lists(session, n: int, size: int, show: int = 0) -> dict[str, float]:
    prompts, truths, hues = [], [], []
    # The last val-range seeds: the benchmark's category blocks and the open questions take from the start.
    for seed in seed_block("val", len(SEED_RANGES["val"]) // n - 1, n):
        rng = np.random.default_rng(seed)
        scene = S.sample_scene(rng, min_objects=2)
        edited, sentence = base_data.coarse_change(scene, rng)
        images = [render.render(scene, seed, size), render.render(edited, seed, size)]
        prompts.append(session.prompt(images, base_data.LIST_PROMPTS[0]))
        truths.append(sentence)
        hues.append(_change_hues(scene, edited))
    cfg = rollout_config(session, 48, (96, 128, 160))
    answers = []
    for b in range(0, len(prompts), 32):
        out = generate_batch(session, prompts[b:b + 32], cfg)
        for r in range(len(out.lengths)):
            text = answer_text(session.decode(out.tokens[r], out.lengths[r]))
            answers.append(next((ln.strip("- ").strip() for ln in text.splitlines() if ln.strip()), ""))

    def grade(shift: int) -> tuple[float, float, float]:
        jac = [float(fact_similarity([a], [truths[(k + shift) % n]])[0, 0]) for k, a in enumerate(answers)]
        hue = [bool({f.split("=")[1] for f in facts(a) if f.startswith("hue=")} & hues[(k + shift) % n])
               for k, a in enumerate(answers)]
        return float(np.mean([j >= 0.85 for j in jac])), float(np.mean(jac)), float(np.mean(hue))

    for k in range(min(show, n)):
        print(f"  pair {k}: truth  {truths[k]}\n          answer {answers[k]}")
    own, other = grade(0), grade(1)
    return {"compare_hit": own[0], "compare_hit_other_pair": other[0], "compare_jaccard": own[1],
            "compare_jaccard_other_pair": other[1], "compare_hue_named": own[2], "compare_hue_named_other_pair": other[2],
            "compare_answered": float(np.mean([bool(facts(a)) for a in answers]))}


def next_token_logits(session, prompt, continuation: list[int]) -> np.ndarray:
    """[vocab] logits of the token after the prompt and `continuation` (token ids), one forward pass."""
    ids = np.concatenate([prompt.input_ids, continuation]).astype(np.int32)[None]
    return np.asarray(session.model(jnp.asarray(ids), pixel_values=jnp.asarray(prompt.pixel_values),
                                    image_grid_thw=prompt.image_grid_thw)[0, -1])


def change_op(scene: S.Scene, edited: S.Scene) -> str:
    """Which of coarse_change's edits turned `scene` into `edited` (read from the two scenes)."""
    if len(edited.objects) != len(scene.objects):
        return "add" if len(edited.objects) > len(scene.objects) else "remove"
    before, after = next((a, b) for a, b in zip(scene.objects, edited.objects) if a != b)
    return "move" if before.cell != after.cell else "recolour" if before.hue != after.hue else "reshape"


def same_pairs(n: int, size: int) -> list[tuple[object, object, str, str]]:
    """n val-range pairs (image, image, kind, op), alternately "same" (one render twice) and "changed" (one
    coarse change, op its change_op), then n // 2 "other" pairs of two unrelated scenes (another background,
    mostly); op is "" but for changed pairs."""
    pairs = []
    for k, seed in enumerate(seed_block("val", len(SEED_RANGES["val"]) // (2 * n) - 2, n)):  # not compare's block
        rng = np.random.default_rng(seed)
        scene = S.sample_scene(rng, min_objects=2)
        same = k % 2 == 0
        second = scene if same else base_data.coarse_change(scene, rng)[0]
        pairs.append((render.render(scene, seed, size), render.render(second, seed, size),
                      "same" if same else "changed", "" if same else change_op(scene, second)))
    for seed in seed_block("val", len(SEED_RANGES["val"]) // (2 * n) - 3, n // 2):
        rng = np.random.default_rng(seed)
        first, second = S.sample_scene(rng, min_objects=2), S.sample_scene(rng, min_objects=2)
        pairs.append((render.render(first, seed, size), render.render(second, seed + 1, size), "other", ""))
    return pairs


def same_or_changed(session, n: int, size: int) -> dict[str, float]:
    """Asked the base data's yes/no comparison question about same_pairs, is the first answer token "Yes"
    likelier than "No" exactly when nothing changed (over the same and changed pairs)? The yes - no logit
    margin per kind of pair, mean and spread, and how well it ranks same pairs above changed and above
    other-scene pairs whatever the yes/no bias (AUC, chance 0.5)."""
    yes, no = (session.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    prefix = session.tokenizer(f"<think>{base_data.COMPARE_THINK}</think><answer>", add_special_tokens=False).input_ids
    right, margins = [], collections.defaultdict(list)
    for first, second, kind, op in same_pairs(n, size):
        prompt = session.prompt([first, second], "Are these two images the same?")
        logits = next_token_logits(session, prompt, prefix)
        margin = float(logits[yes] - logits[no])
        if kind != "other":
            right.append((margin > 0) == (kind == "same"))
        margins[kind].append(margin)
        if op:
            margins[f"changed_{op}"].append(margin)
    same = np.asarray(margins["same"])

    def auc(kind: str) -> float:  # P(margin of a same pair > margin of a `kind` pair), ties half: bias-free
        other = np.asarray(margins[kind])[None, :]
        return float(np.mean((same[:, None] > other) + 0.5 * (same[:, None] == other)))

    ops = sorted(k for k in margins if k.startswith("changed_"))
    return {"same_or_changed_right": float(np.mean(right)), "auc_same_vs_changed": auc("changed"),
            "auc_same_vs_other": auc("other")} | {f"auc_same_vs_{k} (n={len(margins[k])})": auc(k) for k in ops} | {
        f"yes_minus_no_{k}": float(np.mean(v)) for k, v in margins.items()} | {
        f"yes_minus_no_{k}_std": float(np.std(v)) for k, v in margins.items()}


def image_dependence(session, size: int) -> dict[str, float]:
    model, cfg = session.model, session.model.config
    logits, spread, scale = [], [], []
    # The base's own answer up to the colour word, so the next token is the one that names the hue.
    prefix = session.tokenizer(ANSWER_PREFIX, add_special_tokens=False).input_ids
    for hue in S.HUES:
        scene = S.Scene("white", (S.Obj(shape="circle", hue=hue, shade="dark", size="large", pattern="solid",
                                        label="", cell=4, dx=0.0, dy=0.0),))
        prompt = session.prompt([render.render(scene, 0, size)], QUESTIONS["hue"].format(where="center"))
        vision = prepare_vision(prompt.image_grid_thw, cfg.vision)
        feats = np.asarray(model.get_image_features(jnp.asarray(prompt.pixel_values), vision))
        spread.append(float(np.abs(feats - feats.mean(0)).mean()))
        scale.append(float(np.abs(feats).mean()))
        logits.append(next_token_logits(session, prompt, prefix))
    logits = np.stack(logits)
    hue_ids = [session.tokenizer(" " + h, add_special_tokens=False).input_ids[0] for h in S.HUES]
    named = sum(int(np.argmax(row[hue_ids]) == k) for k, row in enumerate(logits))
    return {"max_logit_diff_between_hues": float(np.abs(logits - logits[0]).max()),
            "hues_named_right_of_8": float(named),
            "feature_spread_over_tokens": float(np.mean(spread)), "feature_scale": float(np.mean(scale))}


def answer_type(session, n: int, size: int) -> dict[str, float]:
    options = {f"shape {x}": f"It is {language.article(x)} {x}." for x in S.SHAPES}
    options.update({f"hue {x}": f"It is {x}." for x in S.HUES})
    typed, exact = collections.Counter(), collections.Counter()
    for k, seed in enumerate(seed_block("val", 98, 2 * n)):  # not open_questions' block
        rng = np.random.default_rng(seed)
        scene = S.sample_scene(rng)
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        kind = ("shape", "hue")[k % 2]
        where = "object" if len(scene.objects) == 1 else f"object at the {obj.position}"
        question = f"Tell me the {'shape' if kind == 'shape' else 'colour'} of the {where}."
        think = "I look at the object." if len(scene.objects) == 1 else f"I look at the {obj.position}."
        prompt = session.prompt([render.render(scene, seed, size)], question)
        choice = score_row(session, prompt, f"<think>{think}</think><answer>", options).choice
        typed[kind] += choice.split()[0] == kind
        exact[kind] += choice == f"{kind} {getattr(obj, kind)}"
    return {f"answer_type_{k}": typed[k] / n for k in ("shape", "hue")} | {
        f"answer_exact_{k}": exact[k] / n for k in ("shape", "hue")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--n", type=int, default=64, help="open questions per kind (0: skip them)")
    parser.add_argument("--size", type=int, default=112, help="image side; the processor keeps it as is")
    parser.add_argument("--compare", type=int, default=0, help="two-image pairs to grade (0: skip)")
    parser.add_argument("--same", type=int, default=0, help="same-or-changed pairs, teacher-forced (0: skip)")
    parser.add_argument("--show", type=int, default=0, help="print this many compare answers beside their truth")
    parser.add_argument("--answer_type", type=int, default=0, help="questions per kind, teacher-forced (0: skip)")
    args = parser.parse_args()
    args.min_pixels = args.max_pixels = args.size * args.size  # one image grid, as the base was trained
    session = session_from_args(args)
    for kind, (hit, total) in (open_questions(session, args.n, args.size) if args.n else {}).items():
        chance = {"hue": 1 / 8, "shape": 1 / 6, "count": 1 / 5}[kind]
        print(f"open {kind:<6} {hit}/{total} = {100 * hit / total:5.1f}%  (chance {100 * chance:.1f}%)")
    for key, value in image_dependence(session, args.size).items():
        print(f"{key}: {value:.4g}")
    if args.compare:
        for key, value in compare_lists(session, args.compare, args.size, args.show).items():
            print(f"{key}: {value:.3f}")
    if args.same:
        for key, value in same_or_changed(session, args.same, args.size).items():
            print(f"{key}: {value:.3f}")
    if args.answer_type:
        for key, value in answer_type(session, args.answer_type, args.size).items():
            print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
