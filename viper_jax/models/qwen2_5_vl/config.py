"""Qwen2.5-VL configuration: frozen dataclasses read from / written to HF `config.json`.

Only architecture facts live here. Runtime choices (compute dtype, parameter dtype, remat) are
arguments of the model constructor, because they are not part of a checkpoint.

Defaults are those of transformers' `Qwen2_5_VLTextConfig` / `Qwen2_5_VLVisionConfig`, so a field
missing from a config.json is read exactly as transformers would read it. Sequences are stored as
tuples so the config is hashable (it is static data of the jitted model).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: float = 4
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch row (C * T * P * P = 1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)  # transformers' fallback when the config has none
    use_sliding_window: bool = False
    sliding_window: int | None = None  # transformers nulls it unless use_sliding_window
    max_window_layers: int = 80
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text: hidden_size {t.hidden_size}, heads {t.num_attention_heads} and kv heads "
                             f"{t.num_key_value_heads} must divide evenly")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"text: 2 * sum(mrope_section {list(t.mrope_section)}) must equal head_dim {t.head_dim}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError(f"vision: head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if t.use_sliding_window:
            raise NotImplementedError("use_sliding_window=True is not supported (no released Qwen2.5-VL uses it)")

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen2_5_VLConfig":
        """Reads both the hub's flat layout and transformers v5's nested `text_config` layout."""
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(f"config model_type is {model_type!r}; only {MODEL_TYPE!r} is supported")
        # Like transformers: a nested text_config wins; otherwise the text fields sit at top level.
        t = d["text_config"] if isinstance(d.get("text_config"), dict) else d
        rope = dict(t.get("rope_scaling") or t.get("rope_parameters") or {})  # rope_scaling wins, as in HF
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise NotImplementedError(f"text rope_type {rope_type!r} is not supported (only default/mrope)")
        eos = t.get("eos_token_id", TextConfig.eos_token_id)
        text = _build(TextConfig, t, rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1e6))),
                      mrope_section=tuple(int(x) for x in rope.get("mrope_section", TextConfig.mrope_section)),
                      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                      sliding_window=t.get("sliding_window", 4096) if t.get("use_sliding_window") else None,
                      num_key_value_heads=t.get("num_key_value_heads") or t.get("num_attention_heads",
                                                                             TextConfig.num_attention_heads))
        vd = dict(d.get("vision_config") or {})
        vrope = vd.get("rope_parameters") or {}
        if vrope.get("rope_type", "axial") != "axial":
            raise NotImplementedError(f"vision rope_type {vrope['rope_type']!r} is not supported (only axial)")
        vision = _build(VisionConfig, vd, in_channels=vd.get("in_channels", vd.get("in_chans", 3)),
                        fullatt_block_indexes=tuple(vd.get("fullatt_block_indexes",
                                                           VisionConfig.fullatt_block_indexes)),
                        rope_theta=float(vrope.get("rope_theta", 10000.0)))
        # v5 moved tie_word_embeddings to the top; pre-v5 saves may carry it inside text_config.
        tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
        top = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name not in ("text", "vision") and f.name in d}
        top["tie_word_embeddings"] = tie
        return cls(text=text, vision=vision, **top)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Qwen2_5_VLConfig":
        file = Path(path) / "config.json"
        try:
            with open(file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:  # its own message does not name the file
            raise ValueError(f"{file}: not valid JSON: {e}") from None
        return cls.from_hf_dict(data)

    # ------------------------------------------------------------------ writing

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The nested v5 layout that `Qwen2_5_VLForConditionalGeneration.from_pretrained` reads."""
        t = dataclasses.asdict(self.text)
        t.update(model_type="qwen2_5_vl_text",
                 rope_parameters={"rope_type": "default", "rope_theta": t.pop("rope_theta"),
                                  "mrope_section": list(t.pop("mrope_section"))},
                 layer_types=["full_attention"] * self.text.num_hidden_layers, use_cache=True)
        if isinstance(t["eos_token_id"], tuple):
            t["eos_token_id"] = list(t["eos_token_id"])
        v = dataclasses.asdict(self.vision)
        v.update(model_type="qwen2_5_vl_vision", fullatt_block_indexes=list(v["fullatt_block_indexes"]),
                 rope_parameters={"rope_type": "axial", "rope_theta": v.pop("rope_theta")})
        out: dict[str, Any] = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": MODEL_TYPE}
        if dtype is not None:
            out["dtype"] = dtype
        out.update(text_config=t, vision_config=v, image_token_id=self.image_token_id,
                   video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
                   vision_end_token_id=self.vision_end_token_id, tie_word_embeddings=self.tie_word_embeddings)
        return out


def _build(kind: type, src: dict[str, Any], **overrides: Any) -> Any:
    """Dataclass `kind` from the keys of `src` it knows (others are ignored), plus overrides."""
    kw = {f.name: src[f.name] for f in dataclasses.fields(kind) if f.name in src}
    kw.update(overrides)
    return kind(**kw)
