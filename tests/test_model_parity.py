"""Qwen2_5_VL (Flax NNX) against transformers' Qwen2_5_VLForConditionalGeneration: fp32, eager attention,
every parameter re-randomised. Weights go through save_pretrained -> load_hf, so loading is covered too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hf_tiny import (build_hf_model, build_inputs, hf_config, hf_logits, to_torch,  # noqa: E402
                     transformers_version_ok, TESTED_TRANSFORMERS)
from viper_jax.models.qwen2_5_vl import (Qwen2_5_VL, get_rope_index, load_hf, prepare_vision,  # noqa: E402
                                         relayout_params)

TOL = 1e-4
VIDEO_SECONDS = np.array([0.75], np.float32)  # tokens_per_second 2 -> temporal step 1.5 (truncated: 0, 1, 3)

CASES = {
    "text_left_pad": [[5], [9]],
    "one_image": [[3, ("image", (1, 8, 12)), 4]],
    # 6x10 patches -> 3x5 merged tokens: not a multiple of the 4x4-token window, so windows are padded.
    "two_images_window_pad": [[3, ("image", (1, 8, 12)), 2, ("image", (1, 6, 10)), 4]],
    "batch_two_samples": [[3, ("image", (1, 4, 4)), 4], [2, ("image", (1, 10, 6)), 1]],
    "video_then_image": [[3, ("video", (3, 4, 6)), 4, ("image", (1, 4, 4)), 2]],
}


def _inputs(case: str) -> dict:
    inputs = build_inputs(CASES[case], seed=1)
    if "pixel_values_videos" in inputs:
        inputs["second_per_grid_ts"] = VIDEO_SECONDS
    return inputs


def _ours(inputs: dict) -> dict:
    """Without mm_token_type_ids: the model derives it from the placeholder ids."""
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}


def _skip_video(case: str) -> None:
    if "video" in case and not transformers_version_ok():
        pytest.skip(f"video rope rules are pinned to transformers {TESTED_TRANSFORMERS}.x")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf_model(hf_config(), seed=0)
    path = tmp_path_factory.mktemp("tiny_untied")
    hf.save_pretrained(path)
    return hf, load_hf(path), path


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(pair, case):
    _skip_video(case)
    hf, model, _ = pair
    inputs = _inputs(case)
    ref = hf_logits(hf, inputs)
    out = np.asarray(model(**inputs))  # the same HF-named arguments, mm_token_type_ids included
    diff = float(np.abs(out - ref).max())
    print(f"{case}: max |logits diff| = {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert out.shape == ref.shape
    assert diff <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_rope_index_matches_hf(pair, case):
    _skip_video(case)
    hf, model, _ = pair
    inputs = _inputs(case)
    t = to_torch(inputs)
    ref_pos, ref_delta = hf.model.get_rope_index(
        t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"], image_grid_thw=t.get("image_grid_thw"),
        video_grid_thw=t.get("video_grid_thw"), second_per_grid_ts=t.get("second_per_grid_ts"),
        attention_mask=t["attention_mask"])
    pos, delta = get_rope_index(inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"),
                                inputs.get("video_grid_thw"), inputs.get("second_per_grid_ts"), model.config)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_text_left_pad_with_rope_index_positions(pair):
    """Mask-aware positions (pads skipped) passed explicitly to both models."""
    hf, model, _ = pair
    inputs = _inputs("text_left_pad")
    pos, _ = get_rope_index(inputs["input_ids"], inputs["attention_mask"], None, None, None, model.config)
    ref = hf_logits(hf, {**inputs, "position_ids": pos.astype(np.int64)})
    out = np.asarray(model(**_ours(inputs), position_ids=pos))
    assert np.abs(out - ref).max() <= TOL


def test_vision_tower_matches_hf(pair):
    hf, model, _ = pair
    grid = np.array([[1, 8, 12], [2, 4, 6], [1, 18, 10]])  # windows padded, a 2-frame video, 6 windows
    pix = np.random.default_rng(3).normal(size=(int(grid.prod(1).sum()), 1176)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.visual(torch.from_numpy(pix), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()
    out = np.asarray(model.visual(pix, prepare_vision(grid, model.config.vision)))
    diff = float(np.abs(out - ref).max())
    print(f"vision tower: max |diff| = {diff:.2e}")
    assert out.shape == ref.shape and diff <= TOL


def test_vision_segments_are_small(pair):
    _, model, _ = pair
    vi = prepare_vision(np.array([[1, 32, 32], [2, 8, 12]]), model.config.vision)
    assert vi.win_gather.shape[1] == 64  # (window_size / patch_size) ** 2, never N x N
    assert vi.full_gather.shape == (3, 32 * 32)  # one segment per frame
    assert sorted(vi.patch_perm.tolist()) == list(range(32 * 32 + 2 * 8 * 12))


def test_jit_path_with_host_prepared_inputs(pair):
    hf, model, _ = pair
    inputs = _inputs("batch_two_samples")
    cfg = model.config
    pos, _ = get_rope_index(inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"], None, None, cfg)
    vi = prepare_vision(inputs["image_grid_thw"], cfg.vision)

    @nnx.jit
    def forward(m, ids, mask, pix, pos, vi):
        return m(ids, mask, pixel_values=pix, position_ids=pos, vision_inputs=vi)

    out = forward(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], pos, vi)
    assert np.abs(np.asarray(out) - hf_logits(hf, inputs)).max() <= TOL

    @nnx.jit
    def no_positions(m, ids, pix, grid):
        return m(ids, pixel_values=pix, image_grid_thw=grid)

    with pytest.raises(ValueError, match="computed on the host"):
        no_positions(model, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])


def test_kv_cache_prefill_then_decode_matches_full_forward(pair):
    hf, model, _ = pair
    inputs = _inputs("batch_two_samples")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, t = ids.shape
    pos, _ = get_rope_index(ids, mask, inputs["image_grid_thw"], None, None, model.config)
    embeds = model.embed(ids, inputs["pixel_values"], prepare_vision(inputs["image_grid_thw"], model.config.vision))
    slots = t + 3
    cache = model.init_cache(b, slots)
    slot_mask = np.zeros((b, slots), np.int32)
    slot_mask[:, :t] = mask
    prefill = t - 3

    def with_cache(embeds, positions, cache, index):  # T new tokens written at [index, index + T)
        hidden, cache = model.language_model(embeds, positions, slot_mask, cache, index)
        return model.logits_from_hidden(hidden), cache

    logits, cache = with_cache(embeds[:, :prefill], pos[:, :, :prefill], cache, 0)
    steps = [logits]
    for i in range(prefill, t):
        logits, cache = with_cache(embeds[:, i:i + 1], pos[:, :, i:i + 1], cache, i)
        steps.append(logits)
    out = np.concatenate([np.asarray(s) for s in steps], axis=1)
    valid = mask.astype(bool)  # pad queries attend to nothing; their (discarded) outputs may differ
    assert np.abs(out - hf_logits(hf, inputs))[valid].max() <= TOL


def test_logical_axis_names_on_every_parameter(pair):
    _, model, _ = pair
    state = nnx.state(model, nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    spec_of = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    for path, leaf in leaves:
        names = tuple(spec_of[path])
        assert len(names) == leaf.ndim, (jax.tree_util.keystr(path), names, leaf.shape)
        if "layers" in jax.tree_util.keystr(path) or "blocks" in jax.tree_util.keystr(path):
            assert names[0] == "layers"
    lm = specs["language_model"]
    assert tuple(lm["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(lm["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(lm["layers"]["self_attn"]["k_proj"]["bias"]) == ("layers", "kv_heads")
    assert tuple(lm["layers"]["self_attn"]["o_proj"]["kernel"]) == ("layers", "heads", "embed")
    assert tuple(lm["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(lm["norm"]["scale"]) == ("norm",)
    assert tuple(specs["lm_head"]["weight"]) == ("vocab", "embed")
    assert tuple(specs["visual"]["blocks"]["attn"]["qkv"]["kernel"]) == ("layers", "embed", None, "heads")
    assert shapes["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)


def test_bf16_params_and_compute_stay_close(pair):
    hf, _, path = pair
    model = load_hf(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    inputs = build_inputs([[2, ("image", (1, 4, 8)), 3]], seed=2)
    out = model(**_ours(inputs))
    assert out.dtype == jnp.bfloat16
    ref = hf_logits(hf, inputs)
    diff = np.abs(np.asarray(out, np.float32) - ref)
    print(f"bf16 vs fp32 HF: max {diff.max():.3f}, mean {diff.mean():.4f}")
    assert diff.max() < 0.3 and diff.mean() < 0.03


def test_tied_embeddings_match_hf(tmp_path):
    hf = build_hf_model(hf_config(tie=True), seed=5)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert not hasattr(model, "lm_head")
    inputs = build_inputs([[2, ("image", (1, 4, 8)), 3]], seed=2)
    assert np.abs(np.asarray(model(**_ours(inputs))) - hf_logits(hf, inputs)).max() <= TOL


def _text_loss(graphdef):
    ids = np.random.default_rng(0).integers(3, 990, size=(1, 6))
    return jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(ids).astype(jnp.float32).sum()))


@pytest.fixture(scope="module")
def reference_grads(pair):
    graphdef, params = nnx.split(pair[1])
    return params, _text_loss(graphdef)(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(pair, reference_grads, remat):
    params, ref = reference_grads
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen2_5_VL(pair[1].config, remat=remat, rngs=nnx.Rngs(0))))
    got = _text_loss(graphdef)(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)  # fp32 reassociation only


def _grads(model, inputs: dict):
    """Gradients of every parameter of a scalar of the logits (vision tower included)."""
    graphdef, params = nnx.split(model)
    return jax.grad(lambda p: nnx.merge(graphdef, p)(**_ours(inputs)).astype(jnp.float32).std())(params)


def test_unrolled_layers_match_hf_and_the_scan(pair):
    """scan_layers=False (one module per layer, a Python loop) computes the same model: logits within TOL
    of HF on two images with window padding, and gradients of every parameter (vision tower included)
    equal the scanned model's to fp32 reassociation, once restacked."""
    hf, scanned, path = pair
    unrolled = load_hf(path, scan_layers=False)
    params = nnx.to_pure_dict(nnx.state(unrolled))
    assert sorted(params["language_model"]["layers"]) == list(range(scanned.config.text.num_hidden_layers))
    assert params["visual"]["blocks"][1]["attn"]["qkv"]["kernel"].ndim == 3  # [D, 3, D]: no layer axis
    inputs = build_inputs(CASES["two_images_window_pad"], seed=3)
    assert np.abs(np.asarray(unrolled(**_ours(inputs))) - hf_logits(hf, inputs)).max() <= TOL

    programs = [str(jax.make_jaxpr(lambda: m(**_ours(inputs)))()) for m in (scanned, unrolled)]
    assert [" scan[" in p for p in programs] == [True, False]  # the loop really is unrolled
    ref = nnx.to_pure_dict(_grads(scanned, inputs))
    got = relayout_params(nnx.to_pure_dict(_grads(unrolled, inputs)), stacked=True)
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_query_chunked_attention_matches_hf_and_full_attention(pair):
    """attention_query_chunk: logits within TOL of HF (the sequence is not a multiple of the chunk, so the
    last chunk is padded), gradients equal unchunked attention, and the KV-cache layout chunks alike."""
    hf, full, path = pair
    chunked = Qwen2_5_VL(full.config, attention_query_chunk=7, rngs=nnx.Rngs(0))
    nnx.update(chunked, nnx.state(full))
    inputs = build_inputs(CASES["batch_two_samples"], seed=4)
    assert inputs["input_ids"].shape[1] % 7 != 0
    assert np.abs(np.asarray(chunked(**_ours(inputs))) - hf_logits(hf, inputs)).max() <= TOL

    for a, b in zip(jax.tree.leaves(_grads(full, inputs)), jax.tree.leaves(_grads(chunked, inputs))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    from viper_jax.models.qwen2_5_vl.attention import attend
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 11, 2, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 2, 16, 8)), jnp.float32) for _ in range(2))  # [B, KV, S, d]
    mask = jnp.asarray(rng.random((2, 11, 16)) > 0.3)
    want = attend(q, k, v, mask, 0.3, heads_first=True)
    got = attend(q, k, v, mask, 0.3, heads_first=True, query_chunk=4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    programs = [str(jax.make_jaxpr(lambda c=c: attend(q, k, v, mask, 0.3, True, c))()) for c in (0, 4)]
    assert [" scan[" in p for p in programs] == [False, True]  # 3 chunks of 4 queries really are mapped
