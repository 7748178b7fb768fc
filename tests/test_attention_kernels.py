"""model.attention: Pallas splash attention (in interpret mode on this CPU) and the cuDNN call's plumbing
against the xla path (attention.attend), forward and gradients; the choice per platform; config errors.

Tolerance: fp32 throughout, outputs and gradients at real (non-pad) positions within 2e-5 absolute and
relative (the kernels' online softmax sums in another order than the matmul form; seen: ~1e-6)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from viper_jax.models.qwen2_5_vl import attention_kernels as ak
from viper_jax.models.qwen2_5_vl.attention import attend

TOL = dict(atol=2e-5, rtol=2e-5)
B, T, KV, G, D = 2, 128, 2, 2, 16  # splash blocks are 128: one block per row


def _qkv(t=T, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, KV, G, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, t, KV, D)), jnp.float32) for _ in range(2))
    return q, k, v


def _segments(t=T, left_pad=(20, 0), packed=False):
    """Row i: left_pad[i] pads (0) then tokens (1); packed: row 1 holds two documents (1, 2)."""
    seg = np.ones((B, t), np.int32)
    for i, n in enumerate(left_pad):
        seg[i, :n] = 0
    if packed:
        seg[1, t // 3:] = 2
    return jnp.asarray(seg)


def _xla(q, k, v, seg, scale):
    """attend with the mask the kernels express: causal, and only within a segment."""
    t = q.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    return attend(q, k, v, causal & (seg[:, :, None] == seg[:, None, :]), scale)


def _check(fn, q, k, v, seg, scale=D**-0.5):
    """fn's output and its q/k/v gradients (of a random projection of the real positions) equal xla's."""
    real = (seg > 0)[:, :, None, None, None]
    w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32) * real
    got, want = fn(q, k, v, seg, scale), _xla(q, k, v, seg, scale)
    np.testing.assert_allclose(np.asarray(got * real), np.asarray(want * real), **TOL)
    grads = [jax.grad(lambda q, k, v: jnp.sum(w * f(q, k, v, seg, scale)), argnums=(0, 1, 2))(q, k, v)
             for f in (fn, _xla)]
    for name, a, b in zip("qkv", *grads):
        assert np.all(np.isfinite(np.asarray(a))), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=f"d{name}", **TOL)


def _splash(q, k, v, seg, scale):
    return ak.splash_attend(q, k, v, seg, scale, interpret=True)


# ------------------------------------------------------------------------------------------ kernels

def test_splash_equals_xla_causal():
    _check(_splash, *_qkv(), _segments(left_pad=(0, 0)))


def test_splash_equals_xla_with_left_padding():
    _check(_splash, *_qkv(seed=1), _segments(left_pad=(37, 5)))


def test_splash_equals_xla_with_segment_ids():
    _check(_splash, *_qkv(seed=2), _segments(left_pad=(11, 0), packed=True))


def test_splash_pads_a_length_that_is_not_a_block_multiple():
    q, k, v = _qkv(t=72, seed=3)
    seg = _segments(t=72, left_pad=(9, 0))
    real = (seg > 0)[:, :, None, None, None]
    np.testing.assert_allclose(np.asarray(_splash(q, k, v, seg, 0.25) * real),
                               np.asarray(_xla(q, k, v, seg, 0.25) * real), **TOL)


def test_splash_inside_shard_map_over_a_mesh():
    from viper_jax.sharding import make_mesh, use_mesh

    q, k, v = _qkv(seed=4)
    seg = _segments(left_pad=(3, 40))
    with use_mesh(make_mesh((1, -1, 1))):
        got = jax.jit(lambda *a: _splash(*a, D**-0.5))(q, k, v, seg)
    real = (seg > 0)[:, :, None, None, None]
    np.testing.assert_allclose(np.asarray(got * real), np.asarray(_xla(q, k, v, seg, D**-0.5) * real), **TOL)


def test_cudnn_call_plumbing_equals_xla():
    """The cudnn path's GQA layout, causal flag and pad mask, run by jax's xla implementation here (the
    cuDNN kernel itself needs a GPU and bf16/fp16)."""
    cudnn_here = lambda q, k, v, seg, scale: ak.cudnn_attend(q, k, v, seg, scale, implementation="xla")
    _check(cudnn_here, *_qkv(seed=5), _segments(left_pad=(30, 0), packed=True))


# ------------------------------------------------------------------------------------------ the model

@pytest.fixture(scope="module")
def tiny():
    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.models.qwen2_5_vl import Qwen2_5_VL
    from viper_jax.tiny import tiny_model_config

    cfg = tiny_model_config(build_tiny_tokenizer())
    models = {a: Qwen2_5_VL(cfg, attention=a, rngs=nnx.Rngs(0)) for a in ("xla", "splash")}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, size=(2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    mask[0, :25] = 0  # left padding
    return cfg, models, jnp.asarray(ids), jnp.asarray(mask)


def test_model_forward_and_gradients_equal_with_splash(tiny):
    _, models, ids, mask = tiny
    real = mask.astype(bool)

    def loss(params, graphdef):
        model = nnx.merge(graphdef, params)
        logits = model(ids, attention_mask=mask)
        return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)[..., :7]), logits

    out = {}
    for name, model in models.items():
        graphdef, params = nnx.split(model)
        out[name] = jax.grad(loss, has_aux=True)(params, graphdef)
    (g_x, l_x), (g_s, l_s) = out["xla"], out["splash"]
    np.testing.assert_allclose(np.asarray(l_s)[np.asarray(real)], np.asarray(l_x)[np.asarray(real)], **TOL)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree_util.tree_leaves_with_path(g_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_rollout_prefill_equals_with_splash(tiny):
    from viper_jax.rollout.engine import RolloutConfig, prefill

    cfg, models, ids, mask = tiny
    positions = jnp.asarray(models["xla"].prepare_inputs(np.asarray(ids), np.asarray(mask))[0])
    rc = RolloutConfig(max_new_tokens=4, max_cache_len=T + 4)
    (lx, cx), (ls, cs) = (prefill(models[a], ids, mask, positions, None, None, rc) for a in ("xla", "splash"))
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lx), **TOL)
    slots = np.concatenate([np.asarray(mask), np.zeros((2, 4), np.int32)], axis=1).astype(bool)  # [B, S]
    for name in ("k", "v"):  # the same keys/values at every real slot ([L, B, KV, S, hd]; pads may differ)
        got, want = (np.asarray(c[name]).transpose(1, 3, 0, 2, 4)[slots] for c in (cs, cx))
        np.testing.assert_allclose(got, want, **TOL)


def test_xla_default_is_the_unchanged_program(tiny):
    """attention="xla" (the default) builds the same decoder as before: no KernelMask, the same jaxpr."""
    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.models.qwen2_5_vl import Qwen2_5_VL
    from viper_jax.tiny import tiny_model_config

    _, models, ids, mask = tiny
    default = Qwen2_5_VL(tiny_model_config(build_tiny_tokenizer()), rngs=nnx.Rngs(0))
    assert default.language_model.attention == "xla"
    np.testing.assert_array_equal(np.asarray(default(ids, attention_mask=mask)),
                                  np.asarray(models["xla"](ids, attention_mask=mask)))


# ------------------------------------------------------------------------------------------ the choice

@pytest.mark.parametrize("where, dtype, want", [("tpu", "float32", "splash"), ("tpu", "bfloat16", "splash"),
                                                ("gpu", "bfloat16", "cudnn"), ("gpu", "float32", "xla"),
                                                ("cpu", "bfloat16", "xla"), ("cpu", "float32", "xla")])
def test_auto_per_platform(monkeypatch, where, dtype, want):
    monkeypatch.setattr(ak, "platform", lambda: where)
    assert ak.resolve_attention("auto", dtype=jnp.dtype(dtype)) == want
    assert ak.resolve_attention("xla") == "xla"


def test_kernels_unavailable_on_the_platform_are_config_errors(monkeypatch):
    from viper_jax.train.config import ConfigError, base_config, model_options

    config = base_config()
    for name, where in (("splash", "cpu"), ("splash", "gpu"), ("cudnn", "cpu"), ("cudnn", "tpu")):
        config.model.attention = name
        with pytest.raises(ConfigError, match=f"config model.attention: '{name}' needs a"):
            model_options(config, platform=where)
    monkeypatch.setattr(ak, "platform", lambda: "tpu")
    config.model.attention = "auto"
    assert model_options(config)["attention"] == "splash"
    config.model.attention, config.model.dtype = "cudnn", "float32"
    with pytest.raises(ConfigError, match="model.attention: 'cudnn' needs model.dtype"):
        model_options(config, platform="gpu")
    config.model.dtype = "bfloat16"
    assert model_options(config, platform="gpu")["attention"] == "cudnn"


def test_unknown_value_is_refused_by_key():
    from viper_jax.train.config import ConfigError, base_config, validate_shared

    config = base_config()
    config.workdir, config.model.path = "/tmp/x", "/tmp/x"
    validate_shared(config)  # the default passes
    config.model.attention = "flash"
    with pytest.raises(ConfigError, match="config model.attention: 'flash' is not one of"):
        validate_shared(config)
    with pytest.raises(ValueError, match="model.attention: 'flash'"):
        ak.resolve_attention("flash")


# ------------------------------------------------------------------------------------------ TPU, ahead of time

@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the tpu extra)")
def test_splash_model_compiles_for_a_tpu_slice_ahead_of_time(monkeypatch):
    """The real (Mosaic) kernel, not interpret mode: the model's forward + gradient with attention="splash",
    bf16, lowered and compiled for an absent v5p:2x2x1 slice, batch over (data, fsdp), heads over tensor."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding

    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.models.qwen2_5_vl import Qwen2_5_VL
    from viper_jax.sharding import use_mesh
    from viper_jax.tiny import tiny_model_config

    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
    mesh = Mesh(np.array(topo.devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    cfg = tiny_model_config(build_tiny_tokenizer(), hidden=256)  # head_dim 64, 2 KV heads
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2_5_VL(cfg, dtype=jnp.bfloat16, attention="splash",
                                                                  rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), state)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)
    pos = jax.ShapeDtypeStruct((3, 4, 256), jnp.int32, sharding=NamedSharding(mesh, P(None, ("data", "fsdp"))))

    def loss(state, ids, pos):
        with use_mesh(mesh):
            logits = nnx.merge(graphdef, state)(ids, attention_mask=(ids > 0).astype(jnp.int32), position_ids=pos)
        return jnp.mean(logits.astype(jnp.float32) ** 2)

    with use_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss)).lower(state, ids, pos)
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, forward and backward
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0
