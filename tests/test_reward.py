"""The ViPER reward: hand-computed values with a deterministic embedder, semantics with the real MiniLM."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from viper_jax.rl import reward as rw  # noqa: E402

S = np.sqrt


class FakeEmbedder:
    """Fixed 2-d vectors per sentence; records every call. Unknown sentences raise (checks splitting)."""

    VECTORS = {
        "The cup is blue.": [1.0, 0.0],
        "A dog sits left.": [0.0, 1.0],
        "The mug is blue.": [0.9, S(1 - 0.81)],  # cos 0.9 with the cup -> hit
        "A cat sleeps.": [0.6, 0.8],               # cos 0.6 / 0.8 -> no hit (tau 0.85)
        "Far away.": [-1.0, 0.0],
        "Unrelated words here.": [S(0.5), -S(0.5)],
    }

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.asarray([self.VECTORS[t] for t in texts], np.float32) * 3.0  # unnormalised on purpose


def wf(answer: str, think: str = "let me look") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


TRUTH = ["The cup is blue.", "A dog sits left."]


def fake_reward(**cfg) -> tuple[rw.ViperReward, FakeEmbedder]:
    c = rw.get_reward_config()
    c.update(cfg)
    emb = FakeEmbedder()
    return rw.ViperReward(c, embedder=emb), emb


# ----------------------------------------------------------------------------------------------- splitting

def test_split_sentences_rules():
    text = ("- The cup is blue. It is 3.5 m tall!\n* a dog\n1. Sign says \"OPEN.\" Next one\n2) x\n...\n  \n"
            "-5 degrees\n• bullet? yes\n是红色的。是蓝色的")
    assert rw.split_sentences(text) == ["The cup is blue.", "It is 3.5 m tall!", "a dog", 'Sign says "OPEN."',
                                        "Next one", "x", "-5 degrees", "bullet?", "yes", "是红色的。", "是蓝色的"]
    assert rw.split_sentences("") == [] and rw.split_sentences(" .. -- \n * ") == []


# ------------------------------------------------------------------------------------ hand-computed values

def test_length_weighted_precision_hand_computed():
    r, _ = fake_reward()
    out = r([wf("The mug is blue. A cat sleeps.")], [TRUTH])
    # "The mug is blue." (16 chars) hits, "A cat sleeps." (13 chars) does not: P = 16 / 29.
    assert out.format[0] == 1 and out.hits[0] == 1 and out.num_sentences[0] == 2 and out.num_truth[0] == 2
    np.testing.assert_allclose(out.precision[0], 16 / 29, rtol=1e-6)
    np.testing.assert_allclose(out.correctness[0], 16 / 29, rtol=1e-6)
    np.testing.assert_allclose(out.reward[0], 0.05 + 0.95 * 16 / 29, rtol=1e-6)
    np.testing.assert_allclose(out.recall[0], 0.5)  # the cup is covered (0.9), the dog is not (0.8)


def test_recall_variant_f1_hand_computed():
    r, _ = fake_reward(correctness="f1")
    out = r([wf("The mug is blue. A cat sleeps.")], [TRUTH])
    # P = 16/29, Rc = 1/2 -> F1 = 2PR/(P+R) = (16/29) / (16/29 + 1/2) = 32/61.
    np.testing.assert_allclose(out.correctness[0], 32 / 61, rtol=1e-6)
    np.testing.assert_allclose(out.reward[0], 0.05 + 0.95 * 32 / 61, rtol=1e-6)
    # One safe sentence: precision 1 but recall 1/2 -> f1 2/3; the precision variant would give 1.
    out = r([wf("The cup is blue.")], [TRUTH])
    np.testing.assert_allclose(out.correctness[0], 2 / 3, rtol=1e-6)
    r_p, _ = fake_reward()
    np.testing.assert_allclose(r_p([wf("The cup is blue.")], [TRUTH]).correctness[0], 1.0, rtol=1e-6)


def test_sentence_similarity_is_the_cosine_a_hit_compares():
    r, _ = fake_reward()
    sim = r.sentence_similarity(["The mug is blue.", "A cat sleeps."], TRUTH)  # vectors scaled by 3: normalised
    np.testing.assert_allclose(sim, [[0.9, S(1 - 0.81)], [0.6, 0.8]], rtol=1e-6)


def test_repeating_a_hit_does_not_raise_precision():
    r, _ = fake_reward()
    one = r([wf("The mug is blue. A cat sleeps.")], [TRUTH]).precision[0]
    two = r([wf("The mug is blue. The mug is blue. A cat sleeps. A cat sleeps.")], [TRUTH]).precision[0]
    np.testing.assert_allclose(one, two, rtol=1e-6)


def test_weights_from_config():
    r, _ = fake_reward(w_format=0.3, w_correct=0.7)
    out = r([wf("The mug is blue. A cat sleeps.")], [TRUTH])
    np.testing.assert_allclose(out.reward[0], 0.3 + 0.7 * 16 / 29, rtol=1e-6)


# -------------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("response, fmt", [
    (wf("The cup is blue."), 1),
    ("  <think></think><answer>The cup is blue.</answer>\n", 1),    # empty reasoning is allowed
    ("<answer>The cup is blue.</answer>", 0),                       # no reasoning block
    (wf("The cup is blue.") + " trailing", 0),                       # text after the answer
    ("preamble " + wf("The cup is blue."), 0),                       # text before the reasoning
    (wf("The cup is blue.") + "<answer>Far away.</answer>", 0),      # a second answer block
    (wf("The cup is blue.", think="<think>x</think>"), 0),          # nested tags
    ("<think>a</think><answer>The cup is blue.", 0),                 # unclosed answer
    (wf(""), 0), (wf("  ... "), 0),                                  # well-formed but no sentence
])
def test_format(response, fmt):
    r, _ = fake_reward()
    assert r([response], [TRUTH]).format[0] == fmt


def test_malformed_scores_correctness_on_best_effort_answer():
    r, _ = fake_reward()
    cases = {
        "The cup is blue.": 1.0,                                          # no tags: the whole response
        "<answer>Far away.</answer> <answer>The cup is blue.</answer> x": 1.0,  # the last answer block
        "<think>Far away.</think><answer>The cup is blue.": 1.0,        # after the unclosed <answer>
        "<think>The cup is blue.</think> Far away.": 16 / 25,          # whole response, tags removed
    }
    out = r(list(cases), [TRUTH] * len(cases), prompt_index=range(len(cases)))
    assert (out.format == 0).all()
    np.testing.assert_allclose(out.correctness, list(cases.values()), rtol=1e-6)
    np.testing.assert_allclose(out.reward, 0.95 * out.correctness, rtol=1e-6)


def test_empty_answer_scores_at_most_w_format():
    r, _ = fake_reward()
    out = r([wf(""), wf("   "), "", "<think>hmm</think><answer></answer>"], [TRUTH] * 4, prompt_index=[0, 1, 2, 3])
    assert (out.reward <= 0.05).all() and (out.correctness == 0).all() and (out.num_sentences == 0).all()


def test_custom_format_regex():
    r, _ = fake_reward(format_regex=r"Answer:(?P<answer>.*)")
    out = r(["Answer: The cup is blue.", wf("The cup is blue.")], [TRUTH], prompt_index=[0, 0])
    assert out.format.tolist() == [1, 0]
    with pytest.raises(ValueError, match="named group"):
        fake_reward(format_regex=r"Answer:(.*)")
    with pytest.raises(ValueError, match="correctness"):
        fake_reward(correctness="recall")


# ------------------------------------------------------------------------------------------------ batching

def test_batched_single_encode_truth_once_and_matches_singles():
    r, emb = fake_reward()
    truths = [TRUTH, ["Far away.", "A dog sits left."]]
    responses = [wf("The mug is blue. A cat sleeps."), wf("The cup is blue."), "A cat sleeps.",
                 wf("Far away."), wf("Unrelated words here. A dog sits left."), wf("")]
    out = r(responses, truths)  # groups of 3: responses 0-2 -> prompt 0, 3-5 -> prompt 1
    assert len(emb.calls) == 1
    texts = emb.calls[0]
    assert len(texts) == len(set(texts)) == 6  # every distinct sentence once, truth included
    for i, resp in enumerate(responses):
        single = r([resp], [truths[i // 3]])
        for key, value in single.as_dict().items():
            np.testing.assert_allclose(out.as_dict()[key][i], value[0], rtol=1e-6, err_msg=f"{key}[{i}]")
    np.testing.assert_allclose(out.precision, [16 / 29, 1, 0, 1, 16 / 37, 0], rtol=1e-6)
    # explicit prompt index, interleaved
    out2 = r([responses[0], responses[3]], truths, prompt_index=[0, 1])
    np.testing.assert_allclose(out2.reward, out.reward[[0, 3]], rtol=1e-6)


def test_prompt_index_errors():
    r, _ = fake_reward()
    with pytest.raises(ValueError, match="groups"):
        r(["a", "b", "c"], [TRUTH, TRUTH])
    with pytest.raises(ValueError, match="prompt_index"):
        r(["a", "b"], [TRUTH], prompt_index=[0, 1])


# ------------------------------------------------------------------------------------------------ registry

def test_registry():
    assert {"viper", "caption_refine", "visual_ops"} <= set(rw.available_rewards())
    emb = FakeEmbedder()
    for task in ("caption_refine", "visual_ops"):
        assert isinstance(rw.get_reward(task, embedder=emb), rw.ViperReward)

    @rw.register_reward("test_length_task")
    def make_length_reward(config=None, scale=1.0):
        def reward(responses, truths, prompt_index=None):
            return np.asarray([scale * len(x) for x in responses], np.float32)
        return reward

    try:
        fn = rw.get_reward("test_length_task", scale=2.0)
        np.testing.assert_array_equal(fn(["ab", "c"], [TRUTH]), [4.0, 2.0])
        with pytest.raises(KeyError, match="already registered"):
            rw.register_reward("test_length_task")(make_length_reward)
        rw.register_reward("test_length_task", overwrite=True)(make_length_reward)
    finally:
        rw._REGISTRY.pop("test_length_task", None)
    with pytest.raises(KeyError, match="no reward"):
        rw.get_reward("nope")


def test_no_torch_or_jax_at_import():
    code = "import sys, viper_jax.rl; assert 'torch' not in sys.modules and 'jax' not in sys.modules, sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------- the real MiniLM

REAL_TRUTH = ["The cup on the table is blue, not red.", "A brown dog sits to the left of the car.",
              "The sign above the door reads OPEN."]


@pytest.fixture(scope="module")
def real():
    r = rw.get_reward("caption_refine")
    assert isinstance(r.embedder, rw.SentenceTransformerEmbedder)
    return r


def test_real_paraphrase_beats_unrelated(real):
    paraphrase = wf("The cup on the table is actually blue, not red.\n"
                    "- A brown dog is sitting to the left of the car.\n- The sign above the door says OPEN.")
    unrelated = wf("A bowl of fruit sits on the kitchen counter. The sky is cloudy and grey.")
    out = real([paraphrase, unrelated], [REAL_TRUTH])
    assert out.hits.tolist() == [3, 0]
    assert out.reward[0] > out.reward[1]
    np.testing.assert_allclose(out.reward, [1.0, 0.05], rtol=1e-6)


def test_real_exact_copy_scores_maximum(real):
    out = real([wf("\n".join(REAL_TRUTH)), wf(" ".join(REAL_TRUTH))], [REAL_TRUTH])
    np.testing.assert_allclose(out.reward, [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out.recall, [1.0, 1.0], rtol=1e-6)


def test_real_malformed_and_empty_bounds(real):
    malformed = ["\n".join(REAL_TRUTH), "<think>ok</think> " + " ".join(REAL_TRUTH[:2]),
                 "<answer>" + REAL_TRUTH[0] + "</answer> and more"]
    out = real(malformed + [wf("")], [REAL_TRUTH], prompt_index=[0] * 4)
    assert (out.format[:3] == 0).all() and (out.correctness[:3] > 0.99).all()
    assert (out.reward[:3] <= 0.95 * out.correctness[:3] + 1e-6).all()
    assert out.reward[3] <= 0.05


def test_real_recall_variant(real):
    import copy

    cfg = copy.deepcopy(real.config)
    cfg.correctness = "f1"
    f1 = rw.ViperReward(cfg)  # shares the loaded model (cached per path/device)
    out = f1([wf(REAL_TRUTH[0])], [REAL_TRUTH])
    # precision 1, recall 1/3 -> f1 = 2 * (1/3) / (4/3) = 1/2
    np.testing.assert_allclose(out.correctness[0], 0.5, rtol=1e-6)


def test_missing_reward_extra_is_named(monkeypatch):
    """Without sentence-transformers (the `jax` extra alone) the ViPER reward refuses when it is built, naming the
    `reward` extra; the toy reward needs none of it (it is imported only when a stage names it)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentence_transformers" else real(name, *a))
    with pytest.raises(rw.RewardDependencyError, match=r"`reward` extra.*viper-jax\[jax,reward\].*sentence_transformers"):
        rw.get_reward("caption_refine")
    toy = rw.get_reward("toy_letters")
    assert toy(["abc1", ""], [(), ()]).reward.tolist() == [0.75, 0.0]


def test_absent_embedding_model_directory_is_refused_when_built(tmp_path):
    """A configured directory that is not there: refused when the reward is built, naming the key (no download,
    no late failure after a rollout); an injected embedder needs no directory."""
    cfg = rw.get_reward_config()
    cfg.embedding_model = str(tmp_path / "bge-m3")
    with pytest.raises(rw.EmbeddingModelMissingError, match=r"config reward\.embedding_model: .*bge-m3 is not a directory"):
        rw.get_reward("visual_ops", cfg)
    (tmp_path / "bge-m3").mkdir()
    rw.check_embedding_model(cfg.embedding_model)  # present: accepted
    rw.ViperReward(cfg, embedder=FakeEmbedder())
