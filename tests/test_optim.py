"""train/optim.py: frozen parameter prefixes get no update and no optimizer moments, and the gradient clip
sees only the trained parameters; the rest is AdamW exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from viper_jax.train.config import base_config
from viper_jax.train.optim import frozen_labels, make_optimizer


def _params():
    return {"visual": {"blocks": {"w": jnp.ones((3, 2))}, "merger": {"w": jnp.ones((2,))}},
            "visual_extra": {"w": jnp.ones((2,))},  # shares the prefix's text, not its path
            "language_model": {"w": jnp.ones((4,))}}


def test_frozen_labels_match_whole_path_components():
    labels = frozen_labels(_params(), ("visual.blocks",))
    assert labels == {"visual": {"blocks": {"w": "frozen"}, "merger": {"w": "train"}},
                      "visual_extra": {"w": "train"}, "language_model": {"w": "train"}}
    assert frozen_labels(_params(), ("visual",))["visual_extra"]["w"] == "train"
    with pytest.raises(ValueError, match=r"config optim.frozen: \['visaul'\] match no parameter"):
        frozen_labels(_params(), ("visual", "visaul"))


def test_frozen_parameters_do_not_move_and_the_rest_is_adamw():
    cfg = base_config().optim
    cfg.learning_rate, cfg.weight_decay, cfg.grad_clip = 0.1, 0.0, 1.0
    cfg.frozen = ("visual",)
    tx, _ = make_optimizer(cfg, 10)
    params = _params()
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 3.0), params)
    updates, state = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates["visual"]))
    # Reference: clip + AdamW over the trained parameters alone (the frozen ones do not enter the norm).
    trained = {"visual_extra": params["visual_extra"], "language_model": params["language_model"]}
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.0))
    ref, _ = ref_tx.update({k: grads[k] for k in trained}, ref_tx.init(trained), trained)
    for k in trained:
        np.testing.assert_allclose(np.asarray(updates[k]["w"]), np.asarray(ref[k]["w"]), rtol=1e-6)
    # No Adam moments are kept for the frozen part.
    moments = [leaf for leaf in jax.tree_util.tree_leaves(state) if getattr(leaf, "shape", ()) == (3, 2)]
    assert moments == []
