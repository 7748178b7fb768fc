"""`viper plan` with rl.packing and model.attention=splash (viper_jax/plan/packed.py): the planned micro-batches
are those the trainer packs, the length distributions are as documented, splash's attention FLOPs count the
blocks the kernel runs, and the packed update compiles for a TPU slice (libtpu; skipped without it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from test_packing import G, N, TP, make_world
from test_plan import needs_libtpu
from viper_jax.plan.packed import attention_keys, draw_lengths, packed_layout
from viper_jax.plan.workload import Shapes
from viper_jax.train import packing
from viper_jax.train.config import base_config, load_config
from viper_jax.train.grpo_batch import response_mask

ROOT = Path(__file__).resolve().parents[1]


def test_planned_micro_batches_are_the_trainers():
    """packed_layout on a batch's lengths = pack_minibatch on the batch itself (prompts, rows, predicted slots,
    packed tokens per micro-batch), two minibatches, a 2-row budget, 2 batch shards."""
    config, _, _, _, batch = make_world()
    lengths = np.asarray([12, 1, 5, 3, 3, 3, 7, 2, 11, 6, 1, 9])
    batch = dataclasses.replace(batch, resp_mask=response_mask(lengths, N))  # every group counted, as planned
    rl = base_config().rl
    rl.packing, rl.num_minibatches, rl.pack_tokens = True, 2, 2 * (TP + N)
    shapes = Shapes(prompt_len=TP, response_len=N, images_per_prompt=1, image_tokens=4, rollout_prompts=4,
                    micro_prompts=1, group_size=G)
    layout = packed_layout(shapes, rl, 2, batch.prompt_mask.sum(axis=1), lengths)
    want = [m for a in (0, 2) for m in packing.pack_minibatch(batch, a, a + 2, config, max_rows=2, multiple=2)]
    got = [(m.prompts, m.rows, m.slots, m.real_tokens) for m in layout.micros]
    assert got == [(m.inputs["prompt_ids"].shape[0], m.inputs["segment_ids"].shape[0], m.inputs["pred_index"].size,
                    m.processed) for m in want]
    assert layout.row_len == TP + N and layout.max_rows == 2 and len(got) >= 3  # the budget cut the minibatches
    assert layout.largest.rows == max(r for _, r, _, _ in got)


def test_length_distributions():
    shapes = Shapes(prompt_len=3072, response_len=2048, images_per_prompt=2, image_tokens=256, rollout_prompts=2000,
                    micro_prompts=4, group_size=5)
    prompts, responses = draw_lengths(shapes, "realistic", seed=0)
    assert prompts.shape == (2000,) and responses.shape == (10000,)
    assert prompts.min() >= 2 * 258 + 16 and prompts.max() <= 3072 and prompts.std() > 500  # varied, in the bucket
    assert responses.min() >= 1 and responses.max() == 2048  # the cap is reached (the long tail, clipped)
    assert abs(responses.mean() - 2048 / 4) < 0.05 * 512  # mean about a quarter of the cap (clipping lowers it)
    assert np.median(responses) < 0.8 * responses.mean()  # long-tailed: most responses are short
    again = draw_lengths(shapes, "realistic", seed=0)
    assert np.array_equal(again[0], prompts) and np.array_equal(again[1], responses)
    full = draw_lengths(shapes, "full")
    assert (full[0] == 3072).all() and (full[1] == 2048).all()
    with pytest.raises(ValueError, match="lengths"):
        draw_lengths(shapes, "uniform")


@pytest.mark.parametrize("length", [128, 384, 1000, 5120])
def test_splash_keys_count_the_blocks_the_kernel_runs(length):
    """attention_keys x length = the (query block, key block) pairs splash's own mask info does not skip,
    times the block area (the kernel built as attention_kernels builds it); xla scores every key."""
    from viper_jax.models.qwen2_5_vl import attention_kernels as ak

    padded = -(-length // ak.SPLASH_BLOCKS[-1]) * ak.SPLASH_BLOCKS[-1]
    kernel = ak._splash_kernel(1, padded, True)
    blocks = np.asarray(kernel.fwd_mask_info.block_mask)
    block = padded // blocks.shape[-1]
    assert attention_keys("splash", length) * length == pytest.approx((blocks != 0).sum() * block * block)
    assert attention_keys("xla", length) == length


def _tiny(packing_on: bool, attention: str = "xla"):
    c = load_config(ROOT / "configs" / "tiny.py")
    c.rl.prompts_per_step, c.rl.group_size, c.rl.num_minibatches, c.rl.micro_batch_prompts = 8, 4, 2, 0
    c.mesh.data, c.mesh.fsdp = 1, 4
    c.rl.packing, c.model.attention = packing_on, attention
    return c


SHAPES = dict(prompt_len=256, response_len=128, images_per_prompt=1, image_tokens=16)


@needs_libtpu
def test_packed_splash_update_compiles_for_tpu_and_plans_fewer_flops():
    """On a v5p:2x2x1 slice: with full lengths the packed update is the padded one (one sequence a row, the
    same FLOPs); with realistic lengths it compiles (splash, Mosaic), fits, and runs fewer FLOPs in fewer
    or smaller micro-batches."""
    from viper_jax.plan.programs import plan

    (padded,) = plan(_tiny(False), "v5p:2x2x1", programs=("micro",), **SHAPES).programs
    (full,) = plan(_tiny(True), "v5p:2x2x1", programs=("micro",), lengths="full", **SHAPES).programs
    assert not padded.error and not full.error, (padded.error, full.error)
    assert full.per_step == padded.per_step
    assert full.model_flops == pytest.approx(padded.model_flops, rel=1e-9)

    r = plan(_tiny(True, "splash"), "v5p:2x2x1", programs=("micro",), lengths="realistic", **SHAPES)
    (micro,) = r.programs
    assert not micro.error and r.fits, micro.error
    assert r.settings["attention"] == "splash" and r.settings["packing"]
    assert micro.per_step * micro.model_flops < 0.7 * padded.per_step * padded.model_flops
    assert any(n.startswith("packing (realistic lengths, seed 0)") for n in r.notes), r.notes
