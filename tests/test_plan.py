"""`viper plan` (AOT compiles for TPU topologies that are not present) and the remat policies it plans with.

The TPU tests need libtpu (the `tpu` extra; CI installs it) and are skipped only when it is missing. The
remat tests run on the CPU backend in fp32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig, TextConfig, VisionConfig, prepare_vision
from viper_jax.models.qwen2_5_vl.rope_index import get_rope_index

ROOT = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'viper-jax[tpu]')")
POLICIES = ("full", "dots", "offload")


def _cfg(layers: int = 2, vision_depth: int = 2) -> Qwen2_5_VLConfig:
    text = TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                      mrope_section=(2, 1, 1), bos_token_id=None, eos_token_id=1, pad_token_id=0)
    vision = VisionConfig(depth=vision_depth, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                          fullatt_block_indexes=(vision_depth - 1,), tokens_per_second=2)
    return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=95, video_token_id=94, vision_start_token_id=93,
                            vision_end_token_id=92)


def _inputs(cfg: Qwen2_5_VLConfig, batch: int = 2, length: int = 24):
    grid = np.asarray([[1, 4, 4]] * batch)  # 4 merged tokens per image, one image per row
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 90, size=(batch, length)).astype(np.int32)
    ids[:, 1] = cfg.vision_start_token_id
    ids[:, 2:6] = cfg.image_token_id
    ids[:, 6] = cfg.vision_end_token_id
    mask = np.ones_like(ids)
    pos, _ = get_rope_index(ids, mask, grid, None, None, cfg)
    pixels = rng.standard_normal((int(grid.prod(axis=1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    return ids, mask, pos, pixels, prepare_vision(grid, cfg.vision)


def _loss_and_params(cfg: Qwen2_5_VLConfig, remat: str, inputs):
    ids, mask, pos, pixels, vi = inputs
    model = Qwen2_5_VL(cfg, dtype=jnp.float32, param_dtype=jnp.float32, remat=remat, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    weights = jax.random.normal(jax.random.key(1), (*ids.shape, cfg.text.vocab_size))

    def loss(p):
        m = nnx.merge(graphdef, p)
        logits = m(jnp.asarray(ids), jnp.asarray(mask), pixel_values=jnp.asarray(pixels), position_ids=jnp.asarray(pos),
                   vision_inputs=vi)
        return jnp.sum(jax.nn.log_softmax(logits) * weights)

    return loss, params


def _text_loss_and_params(cfg: Qwen2_5_VLConfig, remat: str, batch: int, length: int, query_chunk: int = 0):
    """The decoder alone (its scan is the one whose saved activations grow with the sequence)."""
    from viper_jax.models.qwen2_5_vl.text import TextModel

    model = TextModel(cfg.text, remat=remat, query_chunk=query_chunk, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.key(2), (batch, length, cfg.text.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(length)[None, None], (3, batch, length))

    def loss(p):
        hidden, _ = nnx.merge(graphdef, p)(x, pos)
        return jnp.sum(jnp.tanh(hidden))

    return loss, params


# ------------------------------------------------------------------------------------------------ remat (CPU)

@pytest.fixture(scope="module")
def reference_grads():
    cfg = _cfg()
    inputs = _inputs(cfg)
    loss, params = _loss_and_params(cfg, "none", inputs)
    return cfg, inputs, params, jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("policy", POLICIES)
def test_remat_policy_leaves_gradients_unchanged(policy, reference_grads):
    cfg, inputs, params, g0 = reference_grads
    loss, params_r = _loss_and_params(cfg, policy, inputs)
    # Same init (the seed does not depend on the policy), so the gradients must agree.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_r)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g1 = jax.jit(jax.grad(loss))(params_r)
    # Equal up to fp32 rounding: recomputation changes XLA's fusion, not the math.
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))


def test_remat_shrinks_temporaries():
    """XLA's memory analysis of the compiled gradient (CPU): saving less between forward and backward
    needs fewer temporary bytes. Long sequences so the saved activations dominate."""
    cfg = _cfg(layers=4)
    temps, host = {}, {}
    for policy in ("none",) + POLICIES:
        loss, params = _text_loss_and_params(cfg, policy, batch=4, length=256)
        mem = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis()
        temps[policy], host[policy] = mem.temp_size_in_bytes, mem.host_temp_size_in_bytes
    assert temps["full"] < temps["dots"] < temps["none"], temps
    # offload keeps what dots keeps, in host memory instead of device memory.
    assert temps["offload"] <= temps["dots"], (temps, host)


def test_query_chunks_shrink_attention_temporaries():
    """With full remat the backward of one layer holds its [B, H, T, T] fp32 scores (and their
    gradient); attending 128 queries at a time holds an eighth of them. Same gradients."""
    cfg = _cfg(layers=2)
    temps, grads = {}, {}
    for chunk in (0, 128):
        loss, params = _text_loss_and_params(cfg, "full", batch=2, length=1024, query_chunk=chunk)
        step = jax.jit(jax.grad(loss))
        temps[chunk] = step.lower(params).compile().memory_analysis().temp_size_in_bytes
        grads[chunk] = step(params)
    scores = 2 * cfg.text.num_attention_heads * 1024 * 1024 * 4  # one layer's fp32 scores
    assert temps[0] - temps[128] > scores, temps
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[128])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_unknown_remat_policy_is_refused():
    from viper_jax.models.qwen2_5_vl.layers import remat_policy

    with pytest.raises(ValueError, match="offload"):
        remat_policy("everything")


def test_scan_compile_time_does_not_grow_with_depth():
    """Layers are scanned: the compiled gradient of a 28-layer model is the program of a 4-layer one (the
    same instructions, one while loop forward and one backward, only the stacked shapes differ), so XLA
    compiles the same amount of code whatever the depth. Structural, not a clock on shared cores."""
    programs = {}
    for layers in (4, 28):
        loss, params = _text_loss_and_params(_cfg(layers=layers), "full", batch=2, length=32)
        programs[layers] = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    lines = {n: len(text.splitlines()) for n, text in programs.items()}
    loops = {n: text.count(" while(") for n, text in programs.items()}
    assert loops[4] == loops[28] == 2, loops
    # XLA's fusion and copy choices may depend on the stacked shapes (CI once compiled 2346 vs 2320 lines; here
    # both are 2227), so 5% slack; an unrolled 28-layer stack would be about 7 times the 4-layer program.
    assert abs(lines[28] - lines[4]) <= 0.05 * lines[4], lines


# ------------------------------------------------------------------------------------------------ plan (TPU AOT)

def _tiny_config(**mesh):
    from viper_jax.train.config import load_config

    c = load_config(ROOT / "configs" / "tiny.py")
    c.rl.prompts_per_step, c.rl.group_size, c.rl.num_minibatches, c.rl.micro_batch_prompts = 4, 4, 1, 0
    for k, v in mesh.items():
        c.mesh[k] = v
    return c


SHAPES = dict(prompt_len=64, response_len=8, images_per_prompt=1, image_tokens=4)


@pytest.fixture(scope="module")
def tiny_plans():
    from viper_jax.plan.programs import plan

    replicated = plan(_tiny_config(data=4, fsdp=1), "v5p:2x2x1", programs=("all",), **SHAPES)
    sharded = plan(_tiny_config(data=1, fsdp=4), "v5p:2x2x1", programs=("micro", "decode"), **SHAPES)
    return replicated, sharded


@needs_libtpu
def test_plan_compiles_update_and_rollout_for_tpu(tiny_plans):
    from viper_jax.plan.report import format_report

    r, _ = tiny_plans
    assert r.num_devices == 4 and r.chip.name == "TPU v5p"
    names = [p.name for p in r.programs]
    assert names == ["update micro-step", "optimizer apply", "rollout prefill", "rollout decode step"], names
    for p in r.programs:
        assert not p.error, p.error
        assert p.argument > 0 and p.total > 0 and p.xla_flops > 0, p
        # XLA counts a scanned layer once, the analytic count covers every layer: never below XLA's per chip.
        if p.model_flops:
            assert p.model_flops / r.num_devices >= 0.5 * p.xla_flops, (p.name, p.model_flops, p.xla_flops)
    assert r.fits and r.step_seconds > 0 and 0 < r.mfu <= 1
    text = format_report(r)
    assert "FITS" in text and "update micro-step" in text and "rollout decode step" in text


@needs_libtpu
def test_plan_bytes_shrink_as_fsdp_grows(tiny_plans):
    replicated, sharded = tiny_plans
    by_name = lambda r: {p.name: p for p in r.programs}
    a, b = by_name(replicated), by_name(sharded)
    for name in ("update micro-step", "rollout decode step"):
        assert b[name].argument < a[name].argument, (name, a[name].argument, b[name].argument)
        assert b[name].total < a[name].total, (name, a[name].total, b[name].total)
    # Parameters + gradient accumulator dominate the micro-step's arguments: about 4x smaller with fsdp=4.
    assert b["update micro-step"].argument < 0.5 * a["update micro-step"].argument


@needs_libtpu
def test_vision_segments_are_split_over_the_batch_axes():
    """The vision tower's padded attention segments (gathered q/k/v, scores) follow the token sharding:
    with fsdp=4 a chip's temporaries are well under a single chip's (unconstrained, XLA replicated the
    gathered segments and each chip held more than one chip alone). The forward (the rollout's prefill
    runs it) is enough to show the layout and compiles in half the time of the gradient."""
    from viper_jax.models.qwen2_5_vl.vision import VisionTower
    from viper_jax.plan.chips import topology_devices
    from viper_jax.sharding import logical_to_spec, make_mesh, param_shardings, use_mesh

    cfg = _cfg().vision
    devices = topology_devices("v5p:2x2x1")
    vi = prepare_vision(np.asarray([[1, 32, 32]] * 4), cfg)  # 4 images: one full-attention segment per chip
    abstract = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    temps = {}
    for sizes, devs in (((1, 1, 1), devices[:1]), ((1, 4, 1), devices)):
        mesh = make_mesh(sizes, devs)
        params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                              nnx.to_pure_dict(state), param_shardings(abstract, mesh))
        pixels = jax.ShapeDtypeStruct((vi.patch_perm.shape[0], cfg.patch_dim), jnp.float32,
                                      sharding=NamedSharding(mesh, logical_to_spec(("vision_tokens", None))))

        def forward(p, x, mesh=mesh):
            with use_mesh(mesh):
                return nnx.merge(graphdef, p)(x, vi)

        temps[sizes[1]] = jax.jit(forward).lower(params, pixels).compile().memory_analysis().temp_size_in_bytes
    assert temps[4] < 0.5 * temps[1], temps


@needs_libtpu
def test_offload_policy_compiles_for_tpu():
    from viper_jax.plan.programs import plan

    c = _tiny_config(data=1, fsdp=4)
    c.model.remat = "offload"
    r = plan(c, "v5p:2x2x1", programs=("micro",), prompt_len=64, response_len=8, images_per_prompt=0)
    (p,) = r.programs
    assert not p.error, p.error
    assert p.host_temp > 0, p  # the saved activations are in host memory: offloading happened
    c.model.remat = "dots"  # the same residuals kept on the device: no host bytes
    (d,) = plan(c, "v5p:2x2x1", programs=("micro",), prompt_len=64, response_len=8, images_per_prompt=0).programs
    assert not d.error and d.host_temp == 0, d


@needs_libtpu
def test_plan_refuses_a_config_that_does_not_fit(capsys):
    """A rollout whose KV cache alone exceeds a v5e chip's 16 GiB: exit status 1, the reason in the message
    (the command line in-process: a subprocess would pay jax's import and libtpu's start again)."""
    from viper_jax.cli import main as viper

    with pytest.raises(SystemExit) as exit_:
        viper(["plan", "--config", str(ROOT / "configs" / "tiny.py"), "--topology", "v5e:2x2", "--programs", "decode",
               "--prompt_len", "8192", "--response_len", "8192", "--images_per_prompt", "0", "--rollout_prompts",
               "4096", "--config.rl.group_size=4", "--config.rl.prompts_per_step=4096"])
    out = capsys.readouterr()
    assert exit_.value.code == 1, (exit_.value.code, out.out[-2000:], out.err[-2000:])
    assert "does not fit v5e:2x2" in out.err, out.err[-2000:]
    assert "DOES NOT FIT" in out.out and "rollout decode step" in out.out, out.out[-2000:]


@needs_libtpu
def test_plan_refuses_bad_inputs_clearly():
    from viper_jax.plan.chips import PlanError, chip_spec
    from viper_jax.plan.programs import plan

    with pytest.raises(PlanError, match="unknown chip"):
        chip_spec("v9z:2x2")
    with pytest.raises(PlanError, match="tensor"):  # 2 kv heads cannot split 4 ways
        plan(_tiny_config(data=1, fsdp=1, tensor=4), "v5p:2x2x1", programs=("micro",), **SHAPES)


@needs_libtpu
@pytest.mark.slow  # 2-3 minutes here, most of it the micro-step's TPU compile
def test_7b_plan_fits_v5p_128():
    """The 7B config with the data config's largest images (1280 tokens, 2 per prompt) on v5p-128, with the
    settings docs/plan.md gives: every program compiles and fits, with room to spare."""
    from viper_jax.plan.programs import plan
    from viper_jax.plan.report import format_report
    from viper_jax.plan.workload import model_config_for
    from viper_jax.train.config import load_config

    c = load_config(ROOT / "configs" / "qwen2_5_vl_7b.py")
    c.mesh.fsdp, c.mesh.tensor, c.rl.micro_batch_prompts = 32, 2, 32
    r = plan(c, "v5p:4x4x4", model_config=model_config_for(c), programs=("all",))
    assert (r.shapes.image_tokens, r.shapes.images_per_prompt, r.num_devices) == (1280, 2, 64)
    assert r.fits and r.peak_bytes() < 0.5 * r.hbm_per_device, format_report(r)

