"""Tiny offline transformers Qwen2.5-VL models and matching inputs for the parity tests (not a test module).

Every parameter is re-randomised: transformers' init leaves biases at 0 and norm weights at 1, which
would hide a missing bias or norm in the port.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any, Sequence

import numpy as np
import torch
import transformers
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration

# The video rope rules changed between releases (see rope_index.py); parity is pinned to this one.
TESTED_TRANSFORMERS = "5.24"

IMAGE, VIDEO, VSTART, VEND, PAD = 997, 998, 995, 996, 2


def tiny_config_dict(*, tie: bool = False, window_size: int = 112, fullatt: Sequence[int] = (1, 3),
                     depth: int = 4) -> dict[str, Any]:
    """The reference doc's tiny config (v5 nested layout)."""
    return dict(
        model_type="qwen2_5_vl",
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         bos_token_id=0, eos_token_id=1, pad_token_id=PAD),
        vision_config=dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=window_size, out_hidden_size=64,
                           fullatt_block_indexes=list(fullatt), tokens_per_second=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie)


def flat_hub_config_dict(*, tie: bool = False) -> dict[str, Any]:
    """The same model in the hub's flat config.json layout (text fields top level, rope_scaling 'mrope')."""
    d = tiny_config_dict(tie=tie)
    t = d.pop("text_config")
    rope = t.pop("rope_parameters")
    t.update(rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}, rope_theta=rope["rope_theta"])
    d["vision_config"] = dict(d["vision_config"], in_chans=3)
    return {**d, **t, "architectures": ["Qwen2_5_VLForConditionalGeneration"], "torch_dtype": "float32"}


def hf_config(**kw: Any) -> HFConfig:
    d = tiny_config_dict(**kw)
    d.pop("model_type")
    return HFConfig(**d)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name or "ln_q" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif "embed_tokens" in name:
            p.copy_(0.5 * noise)
        else:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(noise / np.sqrt(fan_in))
    return model


def build_hf_model(config: HFConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return randomize_(model, seed).eval()


def build_inputs(samples: Sequence[Sequence[Any]], seed: int = 0, patch_dim: int = 1176) -> dict[str, Any]:
    """NumPy inputs for a batch. Each sample is a list of items: an int n (n random text tokens),
    ("image", (t, h, w)) or ("video", (t, h, w)). Rows are LEFT-padded with PAD to a common length."""
    rng = np.random.default_rng(seed)
    rows, pix = [], {"image": [], "video": []}
    grids: dict[str, list] = {"image": [], "video": []}
    for sample in samples:
        ids: list[int] = []
        for item in sample:
            if isinstance(item, int):
                ids += rng.integers(3, 990, size=item).tolist()
                continue
            kind, (t, h, w) = item
            ids += [VSTART] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [VEND]
            grids[kind].append([t, h, w])
            pix[kind].append(rng.normal(size=(t * h * w, patch_dim)).astype(np.float32))
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    out: dict[str, Any] = dict(input_ids=input_ids, attention_mask=mask,
                               mm_token_type_ids=np.where(input_ids == IMAGE, 1, np.where(input_ids == VIDEO, 2, 0)))
    if grids["image"]:
        out.update(pixel_values=np.concatenate(pix["image"]), image_grid_thw=np.asarray(grids["image"], np.int64))
    if grids["video"]:
        out.update(pixel_values_videos=np.concatenate(pix["video"]), video_grid_thw=np.asarray(grids["video"], np.int64))
    return out


def to_torch(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}


@torch.no_grad()
def hf_logits(model: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, Any]) -> np.ndarray:
    """HF logits; mm_token_type_ids is always passed, or transformers silently falls back to 1D rope."""
    model.model.rope_deltas = None  # HF caches rope deltas across calls
    return model(**to_torch(inputs)).logits.float().numpy()


def transformers_version_ok() -> bool:
    return transformers.__version__.startswith(TESTED_TRANSFORMERS)


def safetensors_in(directory: Any) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in an HF directory, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out
