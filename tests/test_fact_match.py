"""The ShapeWorld fact matcher (viper_common/shapeworld/fact_match.py) and the reward with matcher="shapeworld":
paraphrases of the caption grammar score 1, one changed fact falls under tau, and the reward's precision is
the hand-computed one."""

import dataclasses

import numpy as np
import pytest

from viper_common.shapeworld import language
from viper_common.shapeworld.fact_match import fact_similarity, facts
from viper_common.shapeworld.scene import HUES, SHAPES, Obj, sample_scene
from viper_jax.rl.reward import ViperReward


def test_facts_merge_synonyms_and_regions():
    assert facts('A big spotted circle in pale blue labelled "K" in the upper left.') == {
        "size=large", "pattern=dotted", "shape=circle", "shade=light", "hue=blue", "label=K", "cell=0"}
    assert facts("In the top left corner, there is a large light blue dotted circle marked with a K.") == \
        facts('A big spotted circle in pale blue labelled "K" in the upper left.')
    assert facts("attribute: Change the red square at the bottom to green.") == {
        "op=attribute", "hue=red", "shape=square", "cell=7", "hue=green"}
    assert facts("There are three stars in the second image.") == {"count=3", "shape=star", "image=2"}
    assert facts("I compare the two.") == {"count=2"}
    assert facts("Nothing here.") == frozenset()


def _sentence(obj: Obj, seed: int) -> str:
    rng = np.random.default_rng(seed)
    desc = language.describe_object(obj, rng)
    return f"{desc[0].upper() + desc[1:]} {language.region_phrase(obj.cell, rng)}."


def test_paraphrases_match_and_changed_facts_do_not():
    for seed in range(40):
        obj = sample_scene(np.random.default_rng(seed)).objects[0]
        truth = _sentence(obj, 1000 + seed)
        paraphrase = _sentence(obj, 2000 + seed)  # other synonyms, word order and region phrase
        hue = dataclasses.replace(obj, hue=next(h for h in HUES if h != obj.hue))
        shape = dataclasses.replace(obj, shape=next(s for s in SHAPES if s != obj.shape))
        cell = dataclasses.replace(obj, cell=(obj.cell + 1) % 9)
        sim = fact_similarity([paraphrase, *(_sentence(o, 1000 + seed) for o in (hue, shape, cell))], [truth])
        assert sim[0, 0] == 1.0, (truth, paraphrase)
        assert np.all(sim[1:, 0] < 0.85), (truth, sim[1:, 0])  # one fact of 5-7 changed: at most 6/8


def test_reward_with_the_fact_matcher_hand_computed():
    reward = ViperReward({"matcher": "shapeworld"})
    assert reward.embedder is None  # no sentence-transformers model is loaded
    truth = ["The small red circle is at the top left.", "There are two squares."]
    right = "The small red circle sits in the upper left."  # same facts: a hit
    wrong = "The small blue circle is at the top left."  # {small, blue, circle, cell0} vs truth: 3/5 = 0.6
    response = f"<think>look</think><answer>{right} {wrong}</answer>"
    out = reward([response, "<think>x</think><answer>There are two squares.</answer>"], [truth], [0, 0])
    np.testing.assert_allclose(out.precision, [len(right) / (len(right) + len(wrong)), 1.0], rtol=1e-6)
    np.testing.assert_allclose(out.recall, [0.5, 0.5])
    np.testing.assert_allclose(out.reward, 0.05 + 0.95 * out.precision, rtol=1e-6)
    np.testing.assert_array_equal(out.hits, [1, 1])


def test_unknown_matcher_is_refused():
    with pytest.raises(ValueError, match="reward.matcher"):
        ViperReward({"matcher": "bleu"})
