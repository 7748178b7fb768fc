"""`viper plan`'s targets: per-chip TPU figures, abstract devices of a slice (libtpu), and the released
Qwen2.5-VL configs, so a plan needs neither the pod nor the weights."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

# Before jax/libtpu load: libtpu otherwise asks GCE metadata and warns about missing TPU variables, and
# refuses to load while another process on the machine holds /tmp/libtpu_lockfile (no TPU is used here).
for _k, _v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
               ("TF_CPP_MIN_LOG_LEVEL", "2"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_k, _v)

GiB = 2**30


class PlanError(ValueError):
    """A plan that cannot be made (bad topology, shapes that do not divide, ...)."""


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
