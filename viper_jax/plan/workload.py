"""What `viper plan` compiles for: the model config, the static shapes of one GRPO step, and the analytic
FLOPs of the forward passes as this implementation runs them (XLA's cost analysis counts a scanned layer
body once, so it cannot give these)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from viper_jax.plan.chips import HUB_CONFIGS, PlanError


def model_config_for(config: Any, model_config: str | None = None) -> Any:
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
    from viper_jax.train.config import minibatches_per_pass  # light: no model, no jax arrays

    per_minibatch = rl.prompts_per_step // minibatches_per_pass(rl)
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
