"""A sentence similarity for ShapeWorld's English that sees every fact: the reward's `matcher = "shapeworld"`.

The ViPER reward counts an answer sentence as a hit when it is close enough to a truth sentence
(viper_jax/rl/reward.py). With all-MiniLM-L6-v2 embeddings at tau 0.85, a world sentence with one fact
changed still hits: a wrong hue 96% of the time, a wrong shade or size 100%, a wrong cell 99%, while a
faithful paraphrase hits only 74% (scripts/world_reward_probe.py, 300 objects from base_train seeds). The
reward then pays for fluent sentences whatever they say, and perception has no signal. The paper's BGE-M3 cannot
be downloaded here. This matcher stands in for an embedder that tells facts apart, as the world's simulators stand
in for the diffusion models: it reads only the two texts, never a scene.

A sentence's facts are a set of canonical tokens: each attribute word of the world's lexicon (synonyms merged:
pale -> light, big -> large, spotted -> dotted), every grid cell a region phrase names ('upper left' and 'top
left corner' are the same cell), letter labels, number words, 'first' / 'second' (which image), and an edit
line's operation type ("attribute: ..."). Similarity is the Jaccard index of two sentences' sets (0 when either
has none), so a paraphrase scores 1 and one changed fact among six scores 5/7 = 0.71, under tau 0.85.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from viper_common.shapeworld.edits import OPS
from viper_common.shapeworld.language import _LABEL, _POSITION, LEXICON, NUMBER_WORDS, find_cell

_OP_PREFIX = re.compile(rf"^\s*({'|'.join(OPS)})\s*:", re.IGNORECASE)
_ORDINALS = {"first": "image=1", "second": "image=2"}


def facts(sentence: str) -> frozenset[str]:
    """The canonical facts a sentence states (the module docstring lists them)."""
    out: set[str] = set()
    text = sentence
    if m := _OP_PREFIX.match(text):
        out.add(f"op={m.group(1).lower()}")
        text = text[m.end():]
    for m in _LABEL.finditer(text):
        out.add(f"label={m.group(1)}")
    text = _LABEL.sub(" ", text)
    for m in _POSITION.finditer(text):  # each region phrase, read as find_cell reads it
        cell, _ = find_cell(m.group(0))
        out.add(f"cell={cell}")
    text = _POSITION.sub(" ", text)
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in LEXICON:
            field, value = LEXICON[word]
            out.add(f"{field}={value}")
        elif word in NUMBER_WORDS:
            out.add(f"count={NUMBER_WORDS.index(word)}")
        elif word in _ORDINALS:
            out.add(_ORDINALS[word])
    return frozenset(out)


def fact_similarity(answers: Sequence[str], truths: Sequence[str]) -> np.ndarray:
    """[len(answers), len(truths)] Jaccard indices of the sentences' fact sets (the reward's sim matrix)."""
    a = [facts(s) for s in answers]
    t = [facts(s) for s in truths]
    sim = np.zeros((len(a), len(t)), np.float32)
    for i, x in enumerate(a):
        for j, y in enumerate(t):
            if x and y:
                sim[i, j] = len(x & y) / len(x | y)
    return sim
