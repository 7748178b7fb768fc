"""Stop strings (rollout/stop.py): a row is cut after the first token whose prefix's text holds a stop string,
checked against a linear scan on a real byte-level tokenizer; the trainer's responses end there."""

from __future__ import annotations

import numpy as np
import pytest

from viper_jax.rollout.engine import RolloutResult
from viper_jax.rollout.stop import StopStrings

STOP = "</answer>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from viper_jax.tiny import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("stop") / "model")
    return AutoTokenizer.from_pretrained(str(path))


def _decode(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _linear_length(decode, stop: StopStrings, row: np.ndarray, n: int) -> int:
    """The reference: the first k whose prefix's text holds a stop string, else n."""
    return next((k for k in range(1, n + 1) if stop.cut(decode(row[:k].tolist())) is not None), n)


def test_rows_are_cut_at_the_first_stop_string_as_a_linear_scan_finds(tokenizer):
    decode = _decode(tokenizer)
    stop = StopStrings((STOP, "STOP"), decode)
    rng = np.random.default_rng(0)
    letters = [t for c in "abcdefgh <>/" for t in tokenizer.encode(c)]
    width, rows = 40, []
    for r in range(24):
        row = rng.choice(letters, width).tolist()
        if r % 3:  # two of three rows hold a stop string (twice, one of them without a space before it)
            at = int(rng.integers(0, 20))
            row[at:at] = tokenizer.encode(" " + STOP if r % 2 else STOP)
            row[at + 12:at + 12] = tokenizer.encode("STOP")
        rows.append(row[:width])
    tokens = np.asarray(rows, np.int32)
    lengths = rng.integers(30, width + 1, len(rows)).astype(np.int32)
    logprobs = -rng.random(tokens.shape).astype(np.float32)
    result = RolloutResult(tokens=tokens, lengths=lengths, logprobs=logprobs,
                           prompt_index=np.arange(len(rows)), seconds=0.0, kv_cache_bytes=0)
    cut, stopped = stop.apply(result, pad_token_id=0)

    want = np.asarray([_linear_length(decode, stop, t, int(n)) for t, n in zip(tokens, lengths)])
    np.testing.assert_array_equal(cut.lengths, want)
    texts = [decode(t[:int(n)].tolist()) for t, n in zip(tokens, lengths)]
    np.testing.assert_array_equal(stopped, [STOP in t or "STOP" in t for t in texts])
    assert 8 <= stopped.sum() < len(rows)  # both kinds of row are tried
    for r in range(len(rows)):
        n = int(cut.lengths[r])
        np.testing.assert_array_equal(cut.tokens[r, :n], tokens[r, :n])
        assert (cut.tokens[r, n:] == 0).all() and (cut.logprobs[r, n:] == 0).all()
        np.testing.assert_array_equal(cut.logprobs[r, :n], logprobs[r, :n])
        text = stop.trim([decode(cut.tokens[r, :n].tolist())])[0]
        if stopped[r]:  # the trimmed text ends at its first stop string, which starts in the last token
            assert text.endswith(STOP) or text.endswith("STOP"), text
            assert text == texts[r][:len(text)] and stop.cut(text[:-1]) is None
            assert stop.cut(decode(cut.tokens[r, :n - 1].tolist())) is None
        else:
            assert n == lengths[r] and text == texts[r]


def test_stop_strings_are_checked():
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(("",), str)
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings((), str)
