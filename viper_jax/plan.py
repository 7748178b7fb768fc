"""`viper plan`: will a training config fit a TPU pod slice, and how fast could it run? Answered on this
machine, without the pod.

With `libtpu` installed (the `tpu` extra), `jax.experimental.topologies.get_topology_desc` describes the
chips of a TPU slice that is not present; a mesh over those abstract devices plus
`jax.jit(f).lower(abstract inputs).compile()` runs the real TPU compiler. Nothing is allocated: the
parameters come from `nnx.eval_shape` (no weights), every input is a `jax.ShapeDtypeStruct` carrying
the sharding the trainer gives it. Compiled for the target, per program:

- update (one micro-batch forward + backward, gradients added to the donated fp32 accumulator:
  `UpdateFns.accumulate` of the GRPO trainer, the very function `viper train` runs), and the
  optimizer apply (`UpdateFns.apply`);
- rollout: the prefill of the whole prompt batch (the rollout engine's `_prefill`) and one decode
  step over the batch's G samples per prompt (`forward_with_cache` for one token, then sampling).

Per chip: argument / output / temporary bytes from XLA's `memory_analysis()` (the compiler's own
buffer assignment for that chip; it refuses programs larger than HBM), plus what is resident but not
an argument (the optimizer state while the update's micro-steps and the rollout run), against the
chip's HBM.

FLOPs are analytic (`model_flops` below, the matmuls and attention as this implementation runs them,
e.g. attention over all T keys, padded vision segments); XLA's `cost_analysis()` is printed beside them
but counts a scanned (while-loop) layer body once, so it is far below the true count for a scanned model.
Model FLOPs = 3 x forward for a training step; hardware FLOPs add the remat recompute. The time of a
program is a roofline lower bound, max(hardware FLOPs / peak, HBM bytes / HBM bandwidth) per chip, with
no communication time; the GRPO step time adds rollout (prefill + max_new_tokens decode steps, every
row running to the limit), old-log-prob recomputation and the update; MFU = model FLOPs / (time x peak).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

# Before jax/libtpu load: libtpu otherwise asks GCE metadata and warns about missing TPU variables, and
# refuses to load while another process on the machine holds /tmp/libtpu_lockfile (no TPU is used here).
for _k, _v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
               ("TF_CPP_MIN_LOG_LEVEL", "2"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_k, _v)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    hbm_bytes: int          # per chip
    peak_bf16_flops: float  # per chip, dense bf16
    hbm_bandwidth: float    # bytes/s per chip


# Per-chip figures from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e), as listed there on 2025-2026; HBM sizes as the pages give them (GiB).
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("TPU v4", 32 * GiB, 275e12, 1228e9),     # docs/v4: 32 GiB HBM2, 275 TFLOP/s bf16, 1228 GB/s
    "v5e": ChipSpec("TPU v5e", 16 * GiB, 197e12, 819e9),    # docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s
    "v5p": ChipSpec("TPU v5p", 95 * GiB, 459e12, 2765e9),   # docs/v5p: 95 GiB HBM2e, 459 TFLOP/s bf16, 2765 GB/s
    "v6e": ChipSpec("TPU v6e", 32 * GiB, 918e12, 1640e9),   # docs/v6e: 32 GiB HBM, 918 TFLOP/s bf16, 1640 GB/s
}
# Names a topology may use for the same chip (`v5litepod-16` style).
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}

# Hub config.json values (shared/reference/qwen2_5_vl_grpo_diffusers.md A1), so the released models can be
# planned without their weights or config file. Keyed by the model directory's name.
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2.5-VL-7B-Instruct": dict(
        model_type="qwen2_5_vl", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=128000,
        vocab_size=152064, tie_word_embeddings=False,
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2)),
    "Qwen2.5-VL-3B-Instruct": dict(
        model_type="qwen2_5_vl", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=128000,
        vocab_size=151936, tie_word_embeddings=True,
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2)),
}


# --programs names: groups, and the four compiled programs.
PROGRAM_GROUPS = {"update": ("micro", "apply"), "rollout": ("prefill", "decode"),
                  "all": ("micro", "apply", "prefill", "decode")}


class PlanError(ValueError):
    """A plan that cannot be made (bad topology, shapes that do not divide, ...)."""


# ------------------------------------------------------------------------------------------------ target

def chip_spec(topology: str) -> ChipSpec:
    kind = topology.split(":")[0].split("-")[0].lower()
    kind = _ALIASES.get(kind, kind)
    if kind not in CHIPS:
        raise PlanError(f"topology {topology!r}: unknown chip {kind!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]


def topology_devices(topology: str) -> list[Any]:
    """The abstract devices of a TPU slice, e.g. "v5p:4x4x4" (64 chips = v5p-128: v5p-N counts TensorCores,
    2 per chip) or "v5e:4x4" (v5e-16). Needs libtpu."""
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001  (libtpu missing, or an unknown name)
        raise PlanError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); it needs libtpu "
                        f"(pip install 'viper-jax[tpu]') and a name like v5e:4x4, v5p:4x4x4, v6e:4x4") from None
    return list(topo.devices)


def chips_in(topology: str, num_devices: int) -> int:
    dims = topology.split(":", 1)[1] if ":" in topology else ""
    try:
        return math.prod(int(x) for x in dims.split("x"))
    except ValueError:
        return num_devices


# ------------------------------------------------------------------------------------------------ model

def model_config_for(config: Any, model_config: str | None = None):
    """The Qwen2.5-VL config to plan: an explicit config.json (or HF directory), model.path's config.json
    when it exists, the hub values for a released model's directory name, or the tiny CPU model."""
    import json

    from viper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

    if model_config:
        p = Path(model_config)
        p = p / "config.json" if p.is_dir() else p
        return Qwen2_5_VLConfig.from_hf_dict(json.loads(p.read_text()))
    path = Path(config.model.path) if config.model.path else None
    if path is not None and (path / "config.json").is_file():
        return Qwen2_5_VLConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    if path is not None and path.name in HUB_CONFIGS:
        return Qwen2_5_VLConfig.from_hf_dict(HUB_CONFIGS[path.name])
    if config.model.tiny_init:
        from viper_common.tiny_tokenizer import build_tiny_tokenizer
        from viper_jax.tiny import tiny_model_config

        return tiny_model_config(build_tiny_tokenizer())
    raise PlanError(f"no model config: model.path {config.model.path!r} has no config.json and is not one of "
                    f"{sorted(HUB_CONFIGS)}; pass --model_config PATH/config.json")


def image_grid(tokens: int) -> tuple[int, int, int]:
    """(t, h, w) patches of one image with `tokens` merged tokens (h, w even, as near square as possible)."""
    a = max(d for d in range(1, int(math.isqrt(tokens)) + 1) if tokens % d == 0)
    return (1, 2 * a, 2 * (tokens // a))


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static shapes one GRPO step compiles for."""

    prompt_len: int         # Tp: the prompt bucket (left-padded)
    response_len: int       # N: rollout.max_new_tokens
    images_per_prompt: int
    image_tokens: int       # merged tokens per image (patches = 4x)
    rollout_prompts: int    # B: prompts per rollout (rl.prompts_per_step)
    micro_prompts: int      # b: prompts per forward/backward
    group_size: int         # G

    @property
    def patches_per_prompt(self) -> int:
        return self.images_per_prompt * math.prod(image_grid(self.image_tokens)) if self.image_tokens else 0


def default_shapes(config: Any, **override: int | None) -> Shapes:
    rl = config.rl
    per_minibatch = rl.prompts_per_step // rl.num_minibatches
    prompt_len = override.get("prompt_len") or max(config.data.length_buckets)
    images = override.get("images_per_prompt")
    images = 2 if images is None else images  # visual_ops: the original and the edited image
    tokens = override.get("image_tokens")
    if tokens is None:  # the largest image the processor makes, shrunk so the images fit the prompt
        tokens = config.data.max_pixels // (28 * 28)
        if images:
            tokens = min(tokens, max(1, (prompt_len - 64) // images))
    if images * tokens >= prompt_len:
        raise PlanError(f"{images} images of {tokens} tokens do not fit a prompt of {prompt_len} tokens")
    return Shapes(prompt_len=prompt_len, response_len=override.get("response_len") or config.rollout.max_new_tokens,
                  images_per_prompt=images if tokens else 0, image_tokens=tokens if images else 0,
                  rollout_prompts=override.get("rollout_prompts") or rl.prompts_per_step,
                  micro_prompts=rl.micro_batch_prompts or per_minibatch, group_size=rl.group_size)


# ------------------------------------------------------------------------------------------------ FLOPs

def _text_layer_matmul_params(t: Any) -> int:
    d, hd = t.hidden_size, t.head_dim
    return d * t.num_attention_heads * hd * 2 + 2 * d * t.num_key_value_heads * hd + 3 * d * t.intermediate_size


def text_forward_flops(t: Any, rows: int, length: int, keys: int, lm_tokens: int) -> float:
    """Decoder forward: weight matmuls, attention over `keys` slots (all of them, as implemented: masked, not
    skipped), and the lm_head over `lm_tokens` positions."""
    per_layer = 2 * rows * length * _text_layer_matmul_params(t) + 4 * rows * length * keys * t.num_attention_heads * t.head_dim
    return t.num_hidden_layers * per_layer + 2 * lm_tokens * t.hidden_size * t.vocab_size


def vision_forward_flops(v: Any, vi: Any) -> float:
    """Vision tower forward for the patches of `vi` (VisionInputs or their shapes), padded segments as run."""
    if vi is None:
        return 0.0
    n = vi.patch_perm.shape[0]
    d = v.hidden_size
    sw, lw = vi.win_gather.shape
    sf, lf = vi.full_gather.shape
    n_full = len(v.fullatt_block_indexes)
    blocks = v.depth * 2 * n * (4 * d * d + 3 * d * v.intermediate_size)
    attn = (v.depth - n_full) * 4 * sw * lw * lw * d + n_full * 4 * sf * lf * lf * d
    wide = d * v.spatial_merge_size**2
    merger = 2 * (n // v.spatial_merge_size**2) * (wide * wide + wide * v.out_hidden_size)
    return blocks + attn + merger + 2 * n * v.patch_dim * d


def remat_extra(remat: str) -> float:
    """Extra forward passes (hardware, not model, FLOPs) a training step pays for its remat policy:
    full recomputes the layers' forward; dots/offload keep the weight matmuls and recompute the rest
    (attention's batched einsums, elementwise): counted as 0.1 of a forward, a rough share."""
    return {"none": 0.0, "full": 1.0, "dots": 0.1, "offload": 0.1}[remat]


# ------------------------------------------------------------------------------------------------ reports

@dataclasses.dataclass
class ProgramReport:
    name: str
    per_step: float = 1.0     # how many times one GRPO step runs it
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    host_temp: int = 0        # offloaded activations (pinned host memory)
    resident: int = 0         # live on the chip but not an argument (e.g. optimizer state)
    xla_flops: float = 0.0    # cost_analysis, per chip, scanned bodies counted once
    model_flops: float = 0.0  # analytic, whole program, all chips
    hw_flops: float = 0.0     # analytic incl. remat recompute and batch padding, all chips
    hbm_traffic: float = 0.0  # analytic lower bound, bytes per chip (memory-bound programs only)
    seconds: float = 0.0      # roofline lower bound
    compile_s: float = 0.0
    error: str = ""

    @property
    def total(self) -> int:
        """Peak bytes on one chip while the program runs: its buffers plus what stays resident."""
        return self.argument + self.output - self.alias + self.temp + self.code + self.resident


@dataclasses.dataclass
class PlanReport:
    topology: str
    chip: ChipSpec
    num_devices: int
    chips: int
    mesh: dict[str, int]
    settings: dict[str, Any]
    shapes: Shapes
    programs: list[ProgramReport]
    notes: list[str]

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes * self.chips // self.num_devices

    @property
    def peak_per_device(self) -> float:
        return self.chip.peak_bf16_flops * self.chips / self.num_devices

    @property
    def fits(self) -> bool:
        return all(not p.error and p.total <= self.hbm_per_device for p in self.programs)

    @property
    def step_seconds(self) -> float:
        return sum(p.seconds * p.per_step for p in self.programs)

    @property
    def step_model_flops(self) -> float:
        return sum(p.model_flops * p.per_step for p in self.programs)

    @property
    def mfu(self) -> float:
        t = self.step_seconds
        return self.step_model_flops / (t * self.peak_per_device * self.num_devices) if t else 0.0

    def peak_bytes(self) -> int:
        return max((p.total for p in self.programs if not p.error), default=0)

    def problems(self) -> list[str]:
        out = []
        for p in self.programs:
            if p.error:
                out.append(f"{p.name}: {p.error}")
            elif p.total > self.hbm_per_device:
                out.append(f"{p.name} needs {_gib(p.total)} per chip, more than the {_gib(self.hbm_per_device)} "
                           f"of HBM of a {self.chip.name} chip")
        return out


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _fl(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.3g} FLOP"


def format_report(r: PlanReport) -> str:
    s = r.shapes
    lines = [f"viper plan: {r.topology} = {r.chips} x {r.chip.name} ({r.num_devices} devices), "
             f"HBM {_gib(r.hbm_per_device)}/device, peak {r.peak_per_device / 1e12:.0f} TFLOP/s bf16/device",
             f"  mesh {r.mesh}; " + ", ".join(f"{k}={v}" for k, v in r.settings.items()),
             f"  shapes: rollout {s.rollout_prompts} prompts x G={s.group_size}, micro-batch {s.micro_prompts} prompts "
             f"({s.micro_prompts * s.group_size} rows), prompt {s.prompt_len} + response {s.response_len} tokens, "
             + (f"{s.images_per_prompt} image(s) x {s.image_tokens} tokens per prompt" if s.images_per_prompt
                  else "text only")]
    head = (f"  {'program':<22}{'x/step':>7}{'args':>11}{'outputs':>11}{'alias':>11}{'temps':>11}{'resident':>11}"
            f"{'total':>11}{'/HBM':>6}  {'model FLOPs':>12}{'XLA FLOPs/chip':>16}{'est. time':>11}")
    lines += ["  per chip (GiB):", head]
    g = lambda x: f"{x / GiB:>11.2f}"
    for p in r.programs:
        if p.error:
            lines.append(f"  {p.name:<22}{p.per_step:>7g}  DOES NOT COMPILE: {p.error}")
            continue
        lines.append(f"  {p.name:<22}{p.per_step:>7g}{g(p.argument)}{g(p.output)}{g(p.alias)}{g(p.temp)}{g(p.resident)}"
                     f"{g(p.total)}{100 * p.total / r.hbm_per_device:>5.0f}%  {_fl(p.model_flops):>12}"
                     f"{_fl(p.xla_flops):>16}{p.seconds * 1e3:>9.1f}ms")
        if p.host_temp:
            lines.append(f"  {'':<22}  + {_gib(p.host_temp)} of offloaded activations in host memory")
    lines.append(f"  GRPO step: {_fl(r.step_model_flops)} model FLOPs, estimated >= {r.step_seconds:.1f} s "
                 f"(roofline, no communication), MFU <= {100 * r.mfu:.1f}%; peak {_gib(r.peak_bytes())} per device")
    lines += [f"  note: {n}" for n in r.notes]
    problems = r.problems()
    lines.append("  FITS" if not problems else "  DOES NOT FIT:\n" + "\n".join(f"    - {p}" for p in problems))
    return "\n".join(lines)


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


def _cache_names(model: Any, t: Any, dtype: Any) -> tuple[str | None, ...]:
    """Logical names of the KV cache's axes (text.py documents them), matched to `init_cache`'s layout by size
    (sizes chosen distinct), so a change of layout (e.g. heads before slots) needs no change here."""
    probe_b, probe_s = 7919, 7907  # primes no other cache axis has
    shape = jax.eval_shape(lambda: model.init_cache(probe_b, probe_s, dtype))["k"].shape
    by_size = {probe_b: "cache_batch", probe_s: "cache_length", t.num_key_value_heads: "cache_heads"}
    names = ("layers", *(by_size.get(n) for n in shape[1:-1]), None)  # stacked over layers first, head_dim last
    if len(shape) != 5 or shape[0] != t.num_hidden_layers or sorted(filter(None, names[1:])) != sorted(by_size.values()):
        raise PlanError(f"cannot tell the KV cache's axes from its shape {shape}")
    return names


def plan(config: Any, topology: str, *, model_config: Any = None, programs: Sequence[str] = ("update", "rollout"),
         verbose: bool = False, **shape_overrides: int | None) -> PlanReport:
    """Compiles the configured GRPO step for `topology` and reports per-chip memory, FLOPs and time."""
    from viper_jax.models.qwen2_5_vl import Qwen2_5_VL, prepare_vision
    from viper_jax.rollout.engine import RolloutConfig, _prefill
    from viper_jax.rollout.sampling import SamplingConfig, sample
    from viper_jax.sharding import (batch_sharding, logical_to_spec, mesh_from_config, param_shardings,
                                    rules_from_config, use_mesh)
    from viper_jax.train.grpo_step import GRPOSettings, UpdateFns
    from viper_jax.train.optim import make_optimizer
    from viper_jax.train_state import TrainState, train_state_shardings

    chip = chip_spec(topology)
    devices = topology_devices(topology)
    chips = chips_in(topology, len(devices))
    mcfg = model_config if model_config is not None else model_config_for(config)
    t, v = mcfg.text, mcfg.vision
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
    remat = config.model.remat
    rl = config.rl
    shapes = default_shapes(config, **shape_overrides)
    s = shapes
    notes: list[str] = []

    try:
        mesh = mesh_from_config(config.mesh, devices=devices)
        rules = rules_from_config(config.sharding_rules)
        abstract = nnx.eval_shape(lambda: Qwen2_5_VL(mcfg, dtype=dtype, param_dtype=jnp.float32, remat=remat,
                                                     rngs=nnx.Rngs(0)))
        p_sh = param_shardings(abstract, mesh, rules)
    except (ValueError, KeyError) as e:
        raise PlanError(str(e)) from None
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
        if not s.images_per_prompt:
            return None, None
        grid = np.asarray([image_grid(s.image_tokens)] * (prompts * s.images_per_prompt))
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
    num_micro = rl.num_minibatches * (rl.prompts_per_step // rl.num_minibatches) // s.micro_prompts
    if s.rollout_prompts != rl.prompts_per_step:
        num_micro = max(1, s.rollout_prompts // s.micro_prompts)

    # ------------------------------------------------------------------------------------ update
    if wanted & {"micro", "apply"}:
        settings = GRPOSettings.from_config(rl, config.rollout.temperature)
        fns = UpdateFns(graphdef, optimizer, shardings, settings, mesh, rules)
        b, rows, length = s.micro_prompts, s.micro_prompts * s.group_size, s.prompt_len + s.response_len
        p_rows = rows_sharding(b, "micro-batch prompts")
        r_rows = rows_sharding(rows, "micro-batch rows")
        r_rows2 = NamedSharding(mesh, P(*r_rows.spec, None)) if r_rows.spec else replicated
        pix, vi = vision(b)
        mi = dict(prompt_ids=_sds((b, s.prompt_len), jnp.int32, p_rows),
                  prompt_mask=_sds((b, s.prompt_len), jnp.int32, p_rows),
                  positions=_sds((3, rows, length), jnp.int32,
                                 NamedSharding(mesh, P(None, *r_rows.spec)) if r_rows.spec else replicated),
                  tokens=_sds((rows, s.response_len), jnp.int32, r_rows2),
                  resp_mask=_sds((rows, s.response_len), jnp.float32, r_rows2),
                  advantages=_sds((rows,), jnp.float32, r_rows),
                  old_logp=_sds((rows, s.response_len), jnp.float32, r_rows2))
        if pix is not None:
            mi.update(pixel_values=pix, vision_inputs=vi)
        if rl.kl_coef > 0:
            mi["ref_logp"] = mi["old_logp"]
        denoms = {"tokens": _sds((), jnp.float32, replicated), "seqs": _sds((), jnp.float32, replicated)}
        vi_flops = vision_forward_flops(v, vi)
        fwd = text_forward_flops(t, rows, length, length, rows * s.response_len) + vi_flops
        pad = padding(rows)

        micro = ProgramReport("update micro-step", per_step=rl.ppo_epochs * num_micro, resident=opt_bytes)
        if "micro" in wanted:
            _compile(micro, lambda: fns.accumulate.lower(master, master, mi, denoms), verbose)
            micro.model_flops = 3 * fwd
            micro.hw_flops = (3 + remat_extra(remat)) * fwd * pad
            reports.append(micro)

        state = TrainState(step=_sds((), jnp.int32, replicated), params=master, opt_state=opt_state,
                           skipped=_sds((), jnp.int32, replicated))
        apply = ProgramReport("optimizer apply", per_step=rl.ppo_epochs * rl.num_minibatches)
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
        b, g = s.rollout_prompts, s.group_size
        rows, slots = b * g, s.prompt_len + s.response_len
        cache_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.rollout.cache_dtype or "", dtype)
        sampling = SamplingConfig(temperature=float(config.rollout.temperature), top_k=int(config.rollout.top_k),
                                  top_p=float(config.rollout.top_p))
        rcfg = RolloutConfig(max_new_tokens=s.response_len, prompt_buckets=(s.prompt_len,), max_cache_len=slots,
                             group_size=g, sampling=sampling, cache_dtype=cache_dtype)
        cache_names = _cache_names(abstract, t, cache_dtype)
        cache_spec = logical_to_spec(cache_names, rules)
        cache_sh = NamedSharding(mesh, cache_spec)
        p_rows = rows_sharding(b, "rollout prompts")
        pix, vi = vision(b)

        def prefill(params, ids, mask, positions, pixel_values, vision_inputs):
            with use_mesh(mesh, rules):  # as GRPOLearner.step runs generate
                return _prefill.fun(nnx.merge(graphdef, params), ids, mask, positions, pixel_values, vision_inputs, rcfg)

        shape_c = jax.eval_shape(lambda: abstract.init_cache(b, slots, cache_dtype))["k"].shape
        from viper_jax.sharding import check_divisible

        try:
            check_divisible("kv cache", shape_c, cache_spec, mesh)
        except ValueError as e:
            raise PlanError(str(e)) from None
        p = ProgramReport("rollout prefill", resident=opt_bytes)
        args = (master, _sds((b, s.prompt_len), jnp.int32, p_rows), _sds((b, s.prompt_len), jnp.int32, p_rows),
                _sds((3, b, s.prompt_len), jnp.int32, NamedSharding(mesh, P(None, *p_rows.spec)) if p_rows.spec
                     else replicated), pix, vi)
        if "prefill" in wanted:
            _compile(p, lambda: jax.jit(prefill, out_shardings=(p_rows if p_rows.spec else replicated,
                                                                {"k": cache_sh, "v": cache_sh})).lower(*args), verbose)
            # As implemented: logits for every prompt position, then the last one is kept.
            p.model_flops = p.hw_flops = text_forward_flops(t, b, s.prompt_len, slots, b * s.prompt_len) + \
                vision_forward_flops(v, vi)
            p.hw_flops *= padding(b)
            reports.append(p)

        d_rows = rows_sharding(rows, "rollout rows (prompts x G)")
        d_rows2 = NamedSharding(mesh, P(*d_rows.spec, None)) if d_rows.spec else replicated

        def decode_step(params, cache, token, slot_mask, pos, slot, key_data):
            model = nnx.merge(graphdef, params)
            with use_mesh(mesh, rules):
                embeds = model.language_model.embed(token[:, None])
                logits, cache = model.forward_with_cache(embeds, pos, slot_mask, cache, slot)
                tok, lp = sample(logits[:, -1], jax.random.wrap_key_data(key_data), sampling)
            return tok, lp, cache

        dcache = _sds(jax.eval_shape(lambda: abstract.init_cache(rows, slots, cache_dtype))["k"].shape, cache_dtype,
                      cache_sh)
        try:
            check_divisible("decode kv cache", dcache.shape, cache_spec, mesh)
        except ValueError as e:
            raise PlanError(str(e)) from None
        d = ProgramReport("rollout decode step", per_step=s.response_len - 1, resident=opt_bytes)
        dargs = (master, {"k": dcache, "v": dcache}, _sds((rows,), jnp.int32, d_rows),
                 _sds((rows, slots), jnp.int32, d_rows2),
                 _sds((3, rows, 1), jnp.int32, NamedSharding(mesh, P(None, *d_rows.spec)) if d_rows.spec else replicated),
                 _sds((), jnp.int32, replicated), _sds((2,), jnp.uint32, replicated))
        if "decode" in wanted:
            _compile(d, lambda: jax.jit(decode_step, out_shardings=(d_rows, d_rows, {"k": cache_sh, "v": cache_sh}),
                                        donate_argnums=(1,)).lower(*dargs), verbose)
            d.model_flops = d.hw_flops = text_forward_flops(t, rows, 1, slots, rows)
            d.hw_flops *= padding(rows)
            # Every chip reads each layer's weights all-gathered over the batch axes (still split over `tensor`) in
            # the compute dtype, its fp32 shard, and its slice of the cache.
            gathered = sum(math.prod(x.shape) / _parts(sh, mesh, exclude=batch_axes)
                           for x, sh in zip(jax.tree.leaves(master), jax.tree.leaves(shardings.params)))
            d.hbm_traffic = gathered * jnp.dtype(dtype).itemsize + _nbytes(master) + 2 * _nbytes(dcache)
            reports.append(d)

    peak = chip.peak_bf16_flops * chips / len(devices)
    bw = chip.hbm_bandwidth * chips / len(devices)
    for p in reports:
        p.seconds = max(p.hw_flops / len(devices) / peak, p.hbm_traffic / bw)
    settings = {"dtype": config.model.dtype, "remat": remat, "prompts_per_step": rl.prompts_per_step,
                "num_minibatches": rl.num_minibatches, "micro_batch_prompts": rl.micro_batch_prompts,
                "logit_chunk": rl.logit_chunk}
    return PlanReport(topology=topology, chip=chip, num_devices=len(devices), chips=chips, mesh=dict(mesh.shape),
                      settings=settings, shapes=shapes, programs=reports, notes=notes)
