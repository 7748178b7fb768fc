"""`viper eval --score_options`: options chosen by likelihood (viper_jax/evaluation/likelihood.py), checked
against log-probabilities computed independently (one unpadded sequence per candidate, the model run eagerly)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_eval import HEADER, b64, write_tsv  # noqa: E402
from tiny_vlm import build_tiny_vlm_dir, image_bytes  # noqa: E402
from viper_jax.evaluation import likelihood  # noqa: E402


@pytest.mark.parametrize("response,prefix,forced", [
    ("<think>I look.</think><answer>red</answer>", "<think>I look.</think><answer>", False),
    ("<think>I look.</think><answer>", "<think>I look.</think><answer>", False),
    ("<think>I look.</think>red", "<think>I look.</think><answer>", True),
    ("red", "<think></think><answer>", True),
    ("<think>I never close", "<think></think><answer>", True),
])
def test_answer_prefix(response, prefix, forced):
    assert likelihood.answer_prefix(response) == (prefix, forced)


def test_candidates():
    opts = {"A": "red", "B": "dark blue"}
    assert likelihood.candidates(opts, "text") == opts
    assert likelihood.candidates(opts, "letter") == {"A": "A", "B": "B"}
    assert likelihood.candidates({}, "letter") == {"yes": "Yes.", "no": "No."}
    with pytest.raises(ValueError, match="option form"):
        likelihood.candidates(opts, "words")


def _reference_logprob(session, prompt, prefix: str, candidate: str) -> float:
    """Sum of log p(token) over the candidate and '</answer>', one unpadded sequence, the model run eagerly."""
    import jax
    import jax.numpy as jnp

    tok = session.tokenizer
    head = list(prompt.input_ids) + tok(prefix, add_special_tokens=False).input_ids
    tail = tok(candidate + "</answer>", add_special_tokens=False).input_ids
    ids = np.asarray([head + tail], dtype=np.int32)
    pixels = jnp.asarray(prompt.pixel_values) if len(prompt.image_grid_thw) else None
    grids = prompt.image_grid_thw if len(prompt.image_grid_thw) else None
    logits = np.asarray(jax.nn.log_softmax(session.model(jnp.asarray(ids), pixel_values=pixels,
                                                         image_grid_thw=grids)[0].astype(jnp.float32), axis=-1))
    return float(sum(logits[len(head) - 1 + k, t] for k, t in enumerate(tail)))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from viper_jax.inference import load_session

    return load_session(build_tiny_vlm_dir(tmp_path_factory.mktemp("m") / "model", seed=3))


def test_scores_equal_unpadded_log_probabilities(session):
    """Candidates of different lengths share one right-padded pass: each score equals its own sequence's
    log-probability (fp32, 1e-4 absolute); the choice is the argmax; one and two images, and text only."""
    from PIL import Image
    import io

    img = [Image.open(io.BytesIO(image_bytes(k))) for k in range(2)]
    options = {"A": "red", "B": "a dark blue circle", "C": "x", "D": "two"}
    formatted, unformatted = "<think>I look at it.</think><answer>red</answer>", "no format at all"
    for images, response in (([img[0]], formatted), (img, unformatted), ([], formatted)):
        prompt = session.prompt(images, "Which one?\nA. red\nB. a dark blue circle\nC. x\nD. two")
        scored = likelihood.score_row(session, prompt, response, options, "text")
        prefix, forced = likelihood.answer_prefix(response)
        assert scored.forced_prefix == forced
        for letter, text in options.items():
            assert scored.logprobs[letter] == pytest.approx(_reference_logprob(session, prompt, prefix, text),
                                                            abs=1e-4)
        assert scored.choice == max(scored.logprobs, key=scored.logprobs.get)
    yes_no = likelihood.score_row(session, session.prompt([img[0]], "Is it red?"), "", {}, "text")
    assert set(yes_no.logprobs) == {"yes", "no"}
    assert yes_no.logprobs["no"] == pytest.approx(_reference_logprob(session, session.prompt([img[0]], "Is it red?"),
                                                                     "<think></think><answer>", "No."), abs=1e-4)


def test_viper_eval_reports_option_scoring(tmp_path, capsys):
    from viper_jax.cli import main as viper

    model = build_tiny_vlm_dir(tmp_path / "model", seed=1)
    img = b64(image_bytes(0))
    rows = [dict(index=1, question="What animal?", A="cat", B="dog", C="bird", D="fish", answer="B", category="a",
                 image=img),
            dict(index=2, question="Is it night?", answer="no", category="b", image=img),
            dict(index=3, question="Which colour?", A="red", B="blue", answer="A", category="b", image=img)]
    bench = write_tsv(tmp_path / "bench.tsv", HEADER, rows)
    out = tmp_path / "r.json"
    viper(["eval", "--model", str(model), "--tsv", str(bench), "--max_new_tokens", "4", "--prompt_buckets", "512",
           "--score_options", "letter", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["settings"]["score_options"] == "letter"
    f = res["files"]["bench"]
    for p in f["predictions"]:
        assert p["option_choice"] == max(p["option_logprobs"], key=p["option_logprobs"].get)
        assert p["option_correct"] == (p["option_choice"] == p["answer"])
    assert set(f["predictions"][0]["option_logprobs"]) == {"A", "B", "C", "D"}
    assert set(f["predictions"][1]["option_logprobs"]) == {"yes", "no"}
    scoring = f["option_scoring"]
    assert scoring["overall"]["correct"] == sum(p["option_correct"] for p in f["predictions"])
    assert scoring["overall"]["unparsed"] == 0 and set(scoring["categories"]) == {"a", "b"}
    assert "options by likelihood:" in capsys.readouterr().out
