"""scripts/world_diagnose.py --same: its pairs are what they say (the same render twice, one change, two scenes), and
its grading (right and AUC) gives an oracle 1.0 and an image-blind model 0.5."""

import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import world_diagnose as diagnose  # noqa: E402

YES, NO = 5, 7


def test_same_pairs_alternate_identical_renders_and_one_change_then_unrelated_scenes():
    pairs = diagnose.same_pairs(6, 56)
    assert [kind for _, _, kind, _ in pairs] == ["same", "changed"] * 3 + ["other"] * 3
    for first, second, kind, op in pairs:
        assert np.array_equal(np.asarray(first), np.asarray(second)) == (kind == "same")
        assert (op in ("add", "remove", "move", "recolour", "reshape")) == (kind == "changed")


def test_change_op_names_each_coarse_change():
    """Over many scenes change_op recovers every edit coarse_change makes, as its sentence says it."""
    words = {"add": "does not have", "remove": "is missing", "move": "has moved", "recolour": "in the second",
             "reshape": "has become"}
    seen = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        scene = diagnose.S.sample_scene(rng, min_objects=2)
        edited, sentence = diagnose.base_data.coarse_change(scene, rng)
        op = diagnose.change_op(scene, edited)
        assert words[op] in sentence, (op, sentence)
        seen.add(op)
    assert seen == set(words)


class _Session:
    """A stand-in session: its tokenizer maps "Yes"/"No" to fixed ids; its model's last logits favour "Yes"
    by `margin(images)`; a prompt carries the images' pixels."""

    def __init__(self, margin):
        self.margin = margin
        self.tokenizer = lambda text, add_special_tokens=False: types.SimpleNamespace(
            input_ids={"Yes": [YES], "No": [NO]}.get(text, [1, 2, 3]))
        self.model = self._model

    def prompt(self, images, question):
        pixels = np.stack([np.asarray(im, np.float32) for im in images])
        return types.SimpleNamespace(input_ids=np.arange(4), pixel_values=pixels, image_grid_thw=None)

    def _model(self, ids, pixel_values, image_grid_thw):
        logits = np.zeros((1, ids.shape[1], 10), np.float32)
        logits[0, -1, YES] = self.margin(np.asarray(pixel_values))
        return logits


def test_an_oracle_is_always_right_and_an_image_blind_model_is_at_chance():
    oracle = _Session(lambda px: 1.0 if np.array_equal(px[0], px[1]) else -1.0)
    seen = diagnose.same_or_changed(oracle, 8, 56)
    assert seen["same_or_changed_right"] == seen["auc_same_vs_changed"] == seen["auc_same_vs_other"] == 1.0
    blind = diagnose.same_or_changed(_Session(lambda px: -0.5), 8, 56)
    assert blind["same_or_changed_right"] == blind["auc_same_vs_changed"] == blind["auc_same_vs_other"] == 0.5
    # "No" always likelier, but a larger margin for the same pairs: right at chance, the ranking perfect.
    biased = diagnose.same_or_changed(_Session(lambda px: -0.1 if np.array_equal(px[0], px[1]) else -2.0), 8, 56)
    assert biased["same_or_changed_right"] == 0.5 and biased["auc_same_vs_changed"] == 1.0
    assert blind["yes_minus_no_same"] == blind["yes_minus_no_changed"] == blind["yes_minus_no_other"] == -0.5
    assert blind["yes_minus_no_other_std"] == 0.0
