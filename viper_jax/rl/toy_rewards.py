"""Toy rewards with a checkable optimum, for showing that the trainer learns (tests, CPU demo).

`toy_letters`: the fraction of a response's characters that are ASCII lower-case letters. A fresh
tiny model samples nearly uniformly over its 263 byte-level tokens, so about 10% of its characters
are letters: every group has reward spread, and the optimum (1.0) is far away.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Sequence

import numpy as np

from viper_jax.rl.reward import register_reward

LETTERS = frozenset(string.ascii_lowercase)


@dataclasses.dataclass
class ToyRewardOutput:
    reward: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"reward": self.reward}


class LetterFraction:
    def __init__(self, config: Any = None):
        del config  # nothing to configure

    def __call__(self, responses: Sequence[str], truths: Sequence[Sequence[str]],
                 prompt_index: Sequence[int] | None = None) -> ToyRewardOutput:
        del truths, prompt_index
        reward = [sum(c in LETTERS for c in r) / len(r) if r else 0.0 for r in responses]
        return ToyRewardOutput(np.asarray(reward, np.float32))


register_reward("toy_letters", overwrite=True)(LetterFraction)
