"""`viper plan`'s work: compile the GRPO step's programs for a TPU slice that is not present and read
their per-chip memory, FLOPs and time (the package docstring, viper_jax/plan/__init__.py, says how)."""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# chips first: it sets libtpu's environment before anything can load libtpu.
from viper_jax.plan.chips import PlanError, chip_spec, chips_in, topology_devices
from viper_jax.plan.packed import attention_keys, draw_lengths, packed_layout
from viper_jax.plan.report import PlanReport, ProgramReport
from viper_jax.plan.workload import (default_shapes, image_grid, model_config_for, remat_extra, text_forward_flops,
                                     vision_forward_flops)

# --programs names: groups, and the four compiled programs.
PROGRAM_GROUPS = {"update": ("micro", "apply"), "rollout": ("prefill", "decode"),
                  "all": ("micro", "apply", "prefill", "decode")}


# ------------------------------------------------------------------------------------------------ compile

def _memory(p: ProgramReport, compiled: Any) -> None:
    m = compiled.memory_analysis()
    p.argument, p.output, p.alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    p.temp, p.code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
    p.host_temp = getattr(m, "host_temp_size_in_bytes", 0) or 0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    p.xla_flops = float((cost or {}).get("flops", 0.0))


def _compile(p: ProgramReport, lower: Any, verbose: bool) -> Any:
    import time

    t0 = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:  # noqa: BLE001  XlaRuntimeError (RESOURCE_EXHAUSTED when it cannot fit HBM), ...
        msg = str(e).strip().splitlines()
        p.error = " ".join(msg[:3])[:600] if msg else type(e).__name__
        if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
            p.error = "the TPU compiler ran out of HBM: " + p.error
        p.compile_s = time.perf_counter() - t0
        return None
    p.compile_s = time.perf_counter() - t0
    _memory(p, compiled)
    if verbose:
        print(f"  compiled {p.name} in {p.compile_s:.1f} s", file=sys.stderr, flush=True)
    return compiled


def _sds(shape: Sequence[int], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _parts(sharding: NamedSharding, mesh: Mesh, exclude: Sequence[str] = ()) -> int:
    """How many ways an array with `sharding` is split, ignoring the mesh axes in `exclude`."""
    axes = [a for entry in sharding.spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))]
    return math.prod(mesh.shape[a] for a in axes if a not in exclude)


def _nbytes(tree: Any, per_device: bool = True) -> int:
    """Bytes of a tree of ShapeDtypeStructs on one device (the largest shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if per_device and getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def plan(config: Any, topology: str, *, model_config: Any = None, programs: Sequence[str] = ("update", "rollout"),
         verbose: bool = False, lengths: str = "full", seed: int = 0, **shape_overrides: int | None) -> PlanReport:
    """Compiles the configured GRPO step for `topology` and reports per-chip memory, FLOPs and time. `lengths`
    (packed.LENGTHS, drawn with `seed`) shapes rl.packing's micro-batches; the padded update ignores it."""
    from viper_jax.dtypes import dtype_named
    from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, prepare_vision
    from viper_jax.rollout.engine import RolloutConfig, prefill, sample_next
    from viper_jax.rollout.sampling import SamplingConfig
    from viper_jax.sharding import (batch_sharding, check_divisible, logical_to_spec, mesh_from_config,
                                    param_shardings, rules_from_config, use_mesh)
    from viper_jax.train.config import ConfigError, minibatches_per_pass, model_options
    from viper_jax.train.grpo_step import GRPOSettings, UpdateFns
    from viper_jax.train.optim import make_optimizer
    from viper_jax.train.state import TrainState, train_state_shardings

    chip = chip_spec(topology)
    devices = topology_devices(topology)
    chips = chips_in(topology, len(devices))
    mcfg = model_config if model_config is not None else model_config_for(config)
    t, v = mcfg.text, mcfg.vision
    dtype = dtype_named(config.model.dtype)
    remat = config.model.remat
    rl = config.rl
    shapes = default_shapes(config, **shape_overrides)
    notes: list[str] = []

    try:
        mesh = mesh_from_config(config.mesh, devices=devices)
        rules = rules_from_config(config.sharding_rules)
        # model.attention as on a TPU (the target), whatever this machine runs: splash compiles for it here.
        options = model_options(config, platform="tpu")
        abstract = nnx.eval_shape(lambda: Qwen2_5_VL(mcfg, dtype=dtype, param_dtype=jnp.float32, **options,
                                                     rngs=nnx.Rngs(0)))
        p_sh = param_shardings(abstract, mesh, rules)
    except (ValueError, KeyError, ConfigError) as e:
        raise PlanError(str(e)) from None
    attention = options["attention"]
    graphdef, abstract_state = nnx.split(abstract)
    params = nnx.to_pure_dict(abstract_state)
    optimizer, _ = make_optimizer(config.optim, 1000)
    shardings = train_state_shardings(optimizer, params, p_sh)
    master = jax.tree.map(lambda x, sh: _sds(x.shape, jnp.float32, sh), params, shardings.params)
    opt_state = jax.tree.map(lambda x, sh: _sds(x.shape, x.dtype, sh), jax.eval_shape(optimizer.init, master),
                             shardings.opt_state)
    opt_bytes = _nbytes(opt_state)
    replicated = NamedSharding(mesh, P())
    batch_axes = [a for a in jax.tree.leaves(tuple(batch_sharding(mesh, rules).spec))]
    batch_parts = math.prod(mesh.shape[a] for a in batch_axes)

    def rows_sharding(rows: int, what: str, axis: int = 0, ndim: int = 1) -> NamedSharding:
        if rows % batch_parts:
            notes.append(f"{what}: {rows} do not divide over {'x'.join(batch_axes)}={batch_parts}; the inputs "
                         f"are replicated and activations padded to {math.ceil(rows / batch_parts)} rows per device")
            return replicated
        spec = [None] * ndim
        spec[axis] = tuple(batch_axes) if len(batch_axes) > 1 else batch_axes[0]
        return NamedSharding(mesh, P(*spec))

    def padding(rows: int) -> float:
        return math.ceil(rows / batch_parts) * batch_parts / rows

    def vision(prompts: int) -> tuple[Any, Any]:
        if not shapes.images_per_prompt:
            return None, None
        grid = np.asarray([image_grid(shapes.image_tokens)] * (prompts * shapes.images_per_prompt))
        vi = prepare_vision(grid, v)
        n = vi.patch_perm.shape[0]
        pix = _sds((n, v.patch_dim), jnp.float32,
                   NamedSharding(mesh, logical_to_spec(("vision_tokens", None), rules)) if n % batch_parts == 0
                   else replicated)
        return pix, jax.tree.map(lambda a: _sds(a.shape, a.dtype, replicated), vi)

    wanted = set()
    for name in programs:
        wanted |= set(PROGRAM_GROUPS.get(name, (name,)))
    unknown = wanted - set(PROGRAM_GROUPS["all"])
    if unknown:
        raise PlanError(f"unknown programs {sorted(unknown)}; choose from {sorted(PROGRAM_GROUPS)}, "
                        f"{list(PROGRAM_GROUPS['all'])}")
    reports: list[ProgramReport] = []

    def packed_inputs(m: Any, row_len: int) -> dict[str, Any]:
        """pack_micro's dict (train/packing.py) for micro-batch shapes `m`: rows and predicted slots split over
        the batch axes (row_bucket makes rows a multiple of them)."""
        r_sh = rows_sharding(m.rows, "packed rows")
        r2 = NamedSharding(mesh, P(*r_sh.spec, None)) if r_sh.spec else replicated
        k_sh = rows_sharding(m.slots, "packed predicted slots")
        k2 = NamedSharding(mesh, P(None, *k_sh.spec)) if k_sh.spec else replicated
        x = dict(prompt_ids=_sds((m.prompts, shapes.prompt_len), jnp.int32, rows_sharding(m.prompts, "packed prompts")),
                 positions=_sds((3, m.rows, row_len), jnp.int32,
                                NamedSharding(mesh, P(None, *r_sh.spec)) if r_sh.spec else replicated),
                 pred_index=_sds((m.slots,), jnp.int32, k_sh), targets=_sds((1, m.slots), jnp.int32, k2))
        x.update({name: _sds((m.rows, row_len), jnp.int32, r2) for name in ("ids", "segment_ids", "prompt_src")})
        x.update({name: _sds((1, m.slots), jnp.float32, k2)
                  for name in ("resp_mask", "old_logp", "advantages", "seq_tokens")})
        pix, vi = vision(m.prompts)
        if pix is not None:
            x.update(pixel_values=pix, vision_inputs=vi)
        if rl.kl_coef > 0:
            x["ref_logp"] = x["old_logp"]
        return x
    minibatches = minibatches_per_pass(rl)
    num_micro = minibatches * (rl.prompts_per_step // minibatches) // shapes.micro_prompts
    if shapes.rollout_prompts != rl.prompts_per_step:
        num_micro = max(1, shapes.rollout_prompts // shapes.micro_prompts)

    # ------------------------------------------------------------------------------------ update
    if wanted & {"micro", "apply"}:
        settings = GRPOSettings.from_config(rl, config.rollout.temperature)
        fns = UpdateFns(graphdef, optimizer, shardings, settings, mesh, rules)
        b, length = shapes.micro_prompts, shapes.prompt_len + shapes.response_len
        rows = b * shapes.group_size
        padded_notes = len(notes)  # the padded inputs' notes, dropped when the packed ones replace them
        p_rows = rows_sharding(b, "micro-batch prompts")
        r_rows = rows_sharding(rows, "micro-batch rows")
        r_rows2 = NamedSharding(mesh, P(*r_rows.spec, None)) if r_rows.spec else replicated
        pix, vi = vision(b)
        micro_inputs = dict(prompt_ids=_sds((b, shapes.prompt_len), jnp.int32, p_rows),
                  prompt_mask=_sds((b, shapes.prompt_len), jnp.int32, p_rows),
                  positions=_sds((3, rows, length), jnp.int32,
                                 NamedSharding(mesh, P(None, *r_rows.spec)) if r_rows.spec else replicated),
                  tokens=_sds((rows, shapes.response_len), jnp.int32, r_rows2),
                  resp_mask=_sds((rows, shapes.response_len), jnp.float32, r_rows2),
                  advantages=_sds((rows,), jnp.float32, r_rows),
                  old_logp=_sds((rows, shapes.response_len), jnp.float32, r_rows2))
        if pix is not None:
            micro_inputs.update(pixel_values=pix, vision_inputs=vi)
        if rl.kl_coef > 0:
            micro_inputs["ref_logp"] = micro_inputs["old_logp"]
        denoms = {name: _sds((), jnp.float32, replicated) for name in ("tokens", "seqs", "norm_length")}
        vi_flops = vision_forward_flops(v, vi)
        fwd = text_forward_flops(t, rows, length, attention_keys(attention, length), rows * shapes.response_len) \
            + vi_flops
        pad = padding(rows)
        if rl.packing:  # the packed micro-batches of the drawn lengths: one program, for the largest of them
            layout = packed_layout(shapes, rl, batch_parts, *draw_lengths(shapes, lengths, seed))
            del notes[padded_notes:]
            micro_inputs = packed_inputs(layout.largest, layout.row_len)
            # The padded rows as they run: split evenly over the batch shards (pad), as their FLOPs count them.
            padded_fwd, padded_micro, padded_rows = fwd * pad, num_micro, rows * pad
            per_prompt_vision = vision_forward_flops(v, vision(1)[1])
            fwds = [text_forward_flops(t, m.rows, layout.row_len, attention_keys(attention, layout.row_len), m.slots)
                    + m.prompts * per_prompt_vision for m in layout.micros]
            fwd, num_micro, pad = sum(fwds) / len(fwds), len(fwds), 1.0  # rows: multiples of the batch shards
            real = sum(m.real_tokens for m in layout.micros) / sum(m.rows * layout.row_len for m in layout.micros)
            padded_real = sum(m.real_tokens for m in layout.micros) / (padded_micro * padded_rows * length)
            big = layout.largest
            notes.append(
                f"packing ({lengths} lengths, seed {seed}): {num_micro} micro-batches a pass in {layout.distinct_shapes} "
                f"shapes, compiled for the largest ({big.prompts} prompts, {big.rows} rows of {layout.row_len}, "
                f"{big.slots} predicted slots); real tokens {100 * real:.0f}% of the packed rows' positions, "
                f"{100 * padded_real:.0f}% of the padded rows' (as run); forward FLOPs of a pass "
                f"{sum(fwds) / 1e15:.3g} PFLOP packed vs {padded_micro * padded_fwd / 1e15:.3g} PFLOP padded")

        micro = ProgramReport("update micro-step", per_step=rl.ppo_epochs * num_micro, resident=opt_bytes)
        if "micro" in wanted:
            _compile(micro, lambda: fns.accumulate.lower(master, master, micro_inputs, denoms), verbose)
            micro.model_flops = 3 * fwd
            micro.hw_flops = (3 + remat_extra(remat)) * fwd * pad
            if remat in ("dots", "offload"):
                notes.append(f"update micro-step: the recompute of remat={remat} is an estimate, "
                             f"{remat_extra(remat)} of a forward (XLA's cost analysis counts a scanned layer once)")
            reports.append(micro)

        state = TrainState(step=_sds((), jnp.int32, replicated), params=master, opt_state=opt_state,
                           skipped=_sds((), jnp.int32, replicated))
        apply = ProgramReport("optimizer apply", per_step=rl.ppo_epochs * minibatches)
        if "apply" in wanted:
            _compile(apply, lambda: fns.apply.lower(state, master, _sds((), jnp.float32, replicated)), verbose)
            apply.hbm_traffic = 4 * _nbytes(master) + 2 * opt_bytes  # read params, grads, moments; write them back
            reports.append(apply)

        if (rl.recompute_old_logprobs or rl.kl_coef > 0) and "micro" in wanted:  # a forward per micro-batch (same shapes), not compiled
            passes = int(rl.recompute_old_logprobs) + int(rl.kl_coef > 0)
            lp = ProgramReport("old/ref log-probs (est.)", per_step=passes * num_micro)
            lp.model_flops, lp.hw_flops = fwd, fwd * pad
            notes.append("old/ref log-probs: a forward of the micro-batch shapes, FLOPs and time only; its bytes are "
                         "below the micro-step's (no gradients), so it is not compiled")
            reports.append(lp)

    # ------------------------------------------------------------------------------------ rollout
    if wanted & {"prefill", "decode"}:
        b, g = shapes.rollout_prompts, shapes.group_size
        rows, slots = b * g, shapes.prompt_len + shapes.response_len
        cache_dtype = dtype_named(config.rollout.cache_dtype) if config.rollout.cache_dtype else dtype
        sampling = SamplingConfig(temperature=float(config.rollout.temperature), top_k=int(config.rollout.top_k),
                                  top_p=float(config.rollout.top_p))
        rcfg = RolloutConfig(max_new_tokens=shapes.response_len, prompt_buckets=(shapes.prompt_len,),
                             max_cache_len=slots,
                             group_size=g, sampling=sampling, cache_dtype=cache_dtype)
        cache_spec = logical_to_spec(abstract.language_model.cache_axes, rules)  # init_cache's layout
        cache_sh = NamedSharding(mesh, cache_spec)
        p_rows = rows_sharding(b, "rollout prompts")
        pix, vi = vision(b)

        def prefill_program(params, ids, mask, positions, pixel_values, vision_inputs):
            with use_mesh(mesh, rules):  # as GRPOLearner.step runs generate
                return prefill.fun(nnx.merge(graphdef, params), ids, mask, positions, pixel_values, vision_inputs, rcfg)

        shape_c = jax.eval_shape(lambda: abstract.init_cache(b, slots, cache_dtype))["k"].shape
        try:
            check_divisible("kv cache", shape_c, cache_spec, mesh)
        except ValueError as e:
            raise PlanError(str(e)) from None
        p = ProgramReport("rollout prefill", resident=opt_bytes)
        args = (master, _sds((b, shapes.prompt_len), jnp.int32, p_rows),
                _sds((b, shapes.prompt_len), jnp.int32, p_rows),
                _sds((3, b, shapes.prompt_len), jnp.int32, NamedSharding(mesh, P(None, *p_rows.spec)) if p_rows.spec
                     else replicated), pix, vi)
        if "prefill" in wanted:
            _compile(p, lambda: jax.jit(prefill_program, out_shardings=(p_rows if p_rows.spec else replicated,
                                                                {"k": cache_sh, "v": cache_sh})).lower(*args), verbose)
            # The lm_head runs on the last prompt position only (the first sampled token's logits).
            keys = attention_keys(attention, shapes.prompt_len) if attention == "splash" else slots
            p.model_flops = p.hw_flops = (text_forward_flops(t, b, shapes.prompt_len, keys, b)
                                          + vision_forward_flops(v, vi))
            p.hw_flops *= padding(b)
            reports.append(p)

        d_rows = rows_sharding(rows, "rollout rows (prompts x G)")
        d_rows2 = NamedSharding(mesh, P(*d_rows.spec, None)) if d_rows.spec else replicated

        def decode_step(params, caches, token, slot_mask, pos, slot, key_data):
            # One iteration of the engine's `decode` loop (its `sample_next`): the layers unrolled over one
            # cache per layer, then sampling.
            model = nnx.merge(graphdef, params)
            with use_mesh(mesh, rules):
                return sample_next(model, model.language_model.layer_list(), token, pos, slot_mask, caches, slot,
                                   jax.random.wrap_key_data(key_data), sampling)

        dshape = jax.eval_shape(lambda: abstract.init_cache(rows, slots, cache_dtype))["k"].shape
        try:
            check_divisible("decode kv cache", dshape, cache_spec, mesh)
        except ValueError as e:
            raise PlanError(str(e)) from None
        layer_sh = NamedSharding(mesh, P(*tuple(cache_spec)[1:]))  # the stacked layout without its layers axis
        caches = [{"k": _sds(dshape[1:], cache_dtype, layer_sh), "v": _sds(dshape[1:], cache_dtype, layer_sh)}
                  for _ in range(dshape[0])]
        # `decode` holds the prefill's cache (its argument) while the loop runs over the G-times repeated copies.
        prefill_cache = 2 * _nbytes(_sds(shape_c, cache_dtype, cache_sh))
        d = ProgramReport("rollout decode step", per_step=shapes.response_len - 1, resident=opt_bytes + prefill_cache)
        dargs = (master, caches, _sds((rows,), jnp.int32, d_rows),
                 _sds((rows, slots), jnp.int32, d_rows2),
                 _sds((3, rows, 1), jnp.int32, NamedSharding(mesh, P(None, *d_rows.spec)) if d_rows.spec else replicated),
                 _sds((), jnp.int32, replicated), _sds((2,), jnp.uint32, replicated))
        if "decode" in wanted:
            out_caches = [{"k": layer_sh, "v": layer_sh}] * len(caches)
            _compile(d, lambda: jax.jit(decode_step, out_shardings=(d_rows, d_rows, out_caches),
                                        donate_argnums=(1,)).lower(*dargs), verbose)
            d.model_flops = d.hw_flops = text_forward_flops(t, rows, 1, slots, rows)
            d.hw_flops *= padding(rows)
            # Every chip reads each layer's weights all-gathered over the batch axes (still split over `tensor`) in
            # the compute dtype, its fp32 shard, and its slice of the cache.
            gathered = sum(math.prod(x.shape) / _parts(sh, mesh, exclude=batch_axes)
                           for x, sh in zip(jax.tree.leaves(master), jax.tree.leaves(shardings.params)))
            d.hbm_traffic = gathered * jnp.dtype(dtype).itemsize + _nbytes(master) + _nbytes(caches)
            reports.append(d)

    peak = chip.peak_bf16_flops * chips / len(devices)
    bw = chip.hbm_bandwidth * chips / len(devices)
    for p in reports:
        p.seconds = max(p.hw_flops / len(devices) / peak, p.hbm_traffic / bw)
    settings = {"dtype": config.model.dtype, "remat": remat, "attention": attention, "packing": rl.packing,
                "prompts_per_step": rl.prompts_per_step,
                "num_minibatches": minibatches, "micro_batch_prompts": rl.micro_batch_prompts,
                "logit_chunk": rl.logit_chunk}
    return PlanReport(topology=topology, chip=chip, num_devices=len(devices), chips=chips, mesh=dict(mesh.shape),
                      settings=settings, shapes=shapes, programs=reports, notes=notes)
