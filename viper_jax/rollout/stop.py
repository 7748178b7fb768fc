"""Stop strings: a response ends at the first occurrence of any of them, the string included (vLLM's `stop`
with `include_stop_str_in_output`).

The decode loop stops on end *tokens* only (`RolloutConfig.eos_token_ids`); a string such as `</answer>` is
several tokens whose split depends on what precedes it, so it is found in the decoded text afterwards, on the
host: each row is cut after the first token whose prefix's text contains a stop string, its later tokens become
padding and their log-probs 0. The loss, the old log-probs and the reward then see exactly the tokens up to
the stop, as if sampling had ended there. (The decode loop itself still runs such rows to their end token or
the limit: the cut saves update compute, not rollout compute.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from viper_jax.rollout.engine import RolloutResult


class StopStrings:
    """`decode(token_ids) -> text` must be the decode the responses are scored with (special tokens skipped)."""

    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str]):
        self.strings = tuple(str(s) for s in strings)
        if not self.strings or any(not s for s in self.strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(strings)!r}")
        self.decode = decode

    def cut(self, text: str) -> str | None:
        """`text` up to the end of its first stop string (the earliest to end), or None when it has none."""
        ends = [i + len(s) for s in self.strings if (i := text.find(s)) >= 0]
        return text[:min(ends)] if ends else None

    def row_length(self, row: np.ndarray, length: int) -> tuple[int, bool]:
        """(the fewest leading tokens of row[:length] whose text holds a stop string, True), or (length, False)
        when none does. Binary search: a longer prefix's text extends a shorter one's, so "holds a stop string"
        is monotone in the prefix length."""
        if self.cut(self.decode(row[:length].tolist())) is None:
            return length, False
        lo, hi = 1, length  # the answer lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cut(self.decode(row[:mid].tolist())) is None:
                lo = mid + 1
            else:
                hi = mid
        return lo, True

    def apply(self, result: RolloutResult, pad_token_id: int) -> tuple[RolloutResult, np.ndarray]:
        """(the result with every row cut at its first stop string, which rows hold one)."""
        cuts = [self.row_length(row, int(n)) for row, n in zip(result.tokens, result.lengths)]
        lengths = np.asarray([n for n, _ in cuts], result.lengths.dtype).reshape(result.lengths.shape)
        stopped = np.asarray([found for _, found in cuts], bool).reshape(result.lengths.shape)
        live = np.arange(result.tokens.shape[1])[None, :] < lengths[:, None]
        tokens = np.where(live, result.tokens, pad_token_id).astype(result.tokens.dtype)
        logprobs = np.where(live, result.logprobs, 0.0).astype(result.logprobs.dtype)
        return dataclasses.replace(result, tokens=tokens, logprobs=logprobs, lengths=lengths), stopped

    def trim(self, texts: Sequence[str]) -> list[str]:
        """Each text up to its first stop string's end (a row's last token may carry characters past it)."""
        return [t if (c := self.cut(t)) is None else c for t in texts]
