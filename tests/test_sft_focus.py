"""The focus curriculum of `viper sft`: ShapeWorld's base data marks the answer words that state what the
image shows, the SFT pipeline turns them into focus tokens, and the loss covers only them for the first
sft.focus_steps updates (then every answer token, focus tokens weighted by sft.focus_weight)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from viper_common import records as R
from viper_common.shapeworld import base_data
from viper_common.shapeworld.scene import HUES
from viper_jax.tiny import write_tiny_model

NO_DESCRIBE = {"describe": 0.0, "ask": 0.5, "compare": 0.25, "choose": 0.25}  # short answers for the tiny buckets


def test_content_spans_mark_what_the_image_shows():
    """Hand-checked answers: words of the <answer> only, never the think; an option letter is its own span."""
    answer = "<think>I look at the red one.</think><answer>There are two objects: a red circle at the top.</answer>"
    assert [answer[s:e] for s, e in base_data.content_spans(answer)] == ["two", "a red", "circle", "top"]
    for text, words in [("<think>I look at the top.</think><answer>B</answer>", ["B"]),
                        # the article decides a shape answer from a hue answer ("It is red."): it is marked
                        ("<think>x</think><answer>It is a star by an orange circle.</answer>", ["a star", "an orange", "circle"]),
                        ("<think>x</think><answer>It is red, as a rule.</answer>", ["red"]),
                        ("<think>x</think><answer>No, they show two different scenes.</answer>", ["No", "two"])]:
        assert [text[s:e] for s, e in base_data.content_spans(text)] == words
    assert base_data.content_spans("no answer tags") == ()
    # A one-object colour question's only focus word is the object's hue, the scene's own value.
    found = 0
    for index in range(400):
        ex = base_data.example(index, size=56, weights={"describe": 0, "ask": 1, "compare": 0, "choose": 0},
                               one_object_share=1.0)
        if ex.prompt.startswith(("Tell me the colour of the object.", "Which colour does the object have?")):
            words = [ex.answer[s:e] for s, e in ex.focus]
            assert len(words) == 1 and words[0] in HUES and f"It is {words[0]}." in ex.answer
            found += 1
    assert found >= 10


def test_focus_tokens_in_sft_batches(tmp_path):
    """Base data records written to a shard, read by viper sft's pipeline: each row's focus tokens decode to
    exactly its focus words, in order, all inside the answer (loss_mask); loss_weights follow the phase."""
    from transformers import AutoTokenizer

    from test_sft import first_batch, sft_config
    from viper_jax.sft.step import loss_weights

    model_dir = write_tiny_model(tmp_path / "model")
    by_id = _write_base_records(tmp_path / "data" / "part-00000.arrayrecord", 8)
    config = sft_config(tmp_path / "run", f"{tmp_path}/data/*.arrayrecord",
                        ["--config.data.batch_size=8", "--config.data.shuffle=false"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    batch = first_batch(config, tokenizer)
    focus, answer = batch["focus_mask"], batch["loss_mask"]
    assert set(batch["id"]) == set(by_id) and (focus <= answer).all()
    for row, rid in enumerate(batch["id"]):
        ex = by_id[rid]
        words = [ex.answer[s:e] for s, e in ex.focus]
        at = np.flatnonzero(focus[row])
        runs = np.split(at, np.flatnonzero(np.diff(at) > 1) + 1)  # contiguous focus tokens
        pieces = [tokenizer.decode(batch["input_ids"][row][run]) for run in runs]
        # Tokens overlapping a word spell it (a token may carry the leading space; nothing else is marked).
        assert re.findall(r"[A-Za-z]+", " ".join(pieces)) == re.findall(r"[A-Za-z]+", " ".join(words)), (
            ex.answer, pieces)
    only = loss_weights(batch, focus_only=True)
    weighted = loss_weights(batch, focus_weight=3.0)
    np.testing.assert_array_equal(only, focus)
    np.testing.assert_array_equal(weighted, answer + 2.0 * focus)
    np.testing.assert_array_equal(loss_weights(batch), answer)


def test_focus_phase_loss_is_the_mean_nll_of_focus_tokens(tmp_path):
    """The step's loss under focus_only equals the mean of -log softmax(logits)[next token] over the focus
    tokens, computed here from the model's full logits (not through response_logprobs); under focus_weight w
    it is the w-weighted mean over every answer token. fp32: within 1e-5 relative."""
    from transformers import AutoTokenizer

    from test_sft import first_batch, sft_config
    from viper_jax.models.qwen2_5_vl import load_hf
    from viper_jax.sft.step import answer_loss, model_inputs

    model_dir = write_tiny_model(tmp_path / "model", seed=2)
    _write_base_records(tmp_path / "data" / "part-00000.arrayrecord", 6)
    config = sft_config(tmp_path / "run", f"{tmp_path}/data/*.arrayrecord",
                        ["--config.data.batch_size=6", "--config.data.shuffle=false"])
    batch = first_batch(config, AutoTokenizer.from_pretrained(str(model_dir)))
    model = load_hf(model_dir)
    inputs = model_inputs(batch, model.config)
    x = model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["vision_inputs"])
    hidden, _ = model.language_model(x, inputs["positions"], inputs["attention_mask"])
    logits = np.asarray(model.logits_from_hidden(hidden), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ids = np.asarray(batch["input_ids"])
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]  # position t predicts token t+1
    focus, answer = batch["focus_mask"][:, 1:], batch["loss_mask"][:, 1:]
    assert focus.sum() > 0
    step_loss = jax.jit(lambda i: answer_loss(model, i))
    loss, aux = step_loss(model_inputs(batch, model.config, focus_only=True))
    assert float(aux["answer_tokens"]) == focus.sum()
    np.testing.assert_allclose(float(loss), (nll * focus).sum() / focus.sum(), rtol=1e-5)
    loss, _ = step_loss(model_inputs(batch, model.config, focus_weight=4.0))
    w = answer + 3.0 * focus
    np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)


def test_trainer_runs_the_focus_phase_first(tmp_path):
    """focus_steps=2 of 3: the first two logged steps cover only focus tokens (their count), the third every
    answer token; a focus_steps past the run's steps is refused naming the key."""
    from test_sft import metrics, sft_config
    from viper_jax.sft.config import ConfigError, validate
    from viper_jax.sft.trainer import train

    _write_base_records(tmp_path / "data" / "part-00000.arrayrecord", 8)
    config = sft_config(tmp_path / "run", f"{tmp_path}/data/*.arrayrecord",
                        ["--config.steps=3", "--config.data.batch_size=4", "--config.sft.focus_steps=2"])
    train(config)
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["focus_only"] for r in rows] == [1, 1, 0]
    assert rows[0]["answer_tokens"] < 0.5 * rows[2]["answer_tokens"]  # a few words of each answer
    bad = sft_config(tmp_path / "run2", f"{tmp_path}/data/*.arrayrecord", ["--config.sft.focus_steps=1000"])
    with pytest.raises(ConfigError, match="sft.focus_steps"):
        validate(bad)


def _write_base_records(path, n: int) -> dict[str, base_data.Example]:
    exs = list(base_data.examples(n, size=56, weights=NO_DESCRIBE))
    with R.ShardWriter(path) as writer:
        for ex in exs:
            writer.write(ex.to_record())
    return {ex.id: ex for ex in exs}
