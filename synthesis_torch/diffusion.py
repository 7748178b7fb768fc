"""diffusers pipelines loaded by path, placed on a device (or CPU-offloaded), and the stage-1 reconstructor
(text-to-image from the caption alone, `QwenImagePipeline` by default).

Reconstructors sit behind a small registry like editors.py's: `config.t2i.name` picks one (default
"qwen_image"); a module named in `config.t2i.plugin` can `register_reconstructor` another. Built-ins that
live in their own module (BUILTIN_MODULES, e.g. the ShapeWorld simulator) are imported on first use.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Protocol, Sequence

import torch
from PIL import Image


def load_pipeline(cls: Any, path: str, *, device: torch.device, dtype: torch.dtype, offload: str) -> Any:
    """`cls.from_pretrained(path)` on `device`.

    offload (GPU only; ignored on CPU): "none" keeps every component on the GPU; "model" uses
    `enable_model_cpu_offload` (one component on the GPU at a time: Qwen-Image's 20B transformer plus its
    7B text encoder do not fit next to the 7B VLM on one 80 GB GPU otherwise); "sequential" offloads
    layer by layer (slowest, least memory).
    """
    pipe = cls.from_pretrained(path, dtype=dtype)
    if device.type == "cuda" and offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif device.type == "cuda" and offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload not in ("none", "model", "sequential"):
        raise ValueError(f"offload must be none|model|sequential, got {offload!r}")
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # the job's own tqdm bar shows progress
    return pipe


def output_size(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """(w, h) with about `area` pixels, the aspect ratio of (width, height), both multiples of `multiple`."""
    ratio = width / height
    w = max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple)
    h = max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple)
    return w, h


class TextToImage(Protocol):
    path: str  # recorded as the t2i model in every record

    def settings(self) -> dict[str, Any]:
        """Settings recorded in every record's provenance."""

    def size_for(self, image: Image.Image) -> tuple[int, int]:
        """(w, h) of the reconstruction of `image`."""

    def render(self, captions: Sequence[str], sizes: Sequence[tuple[int, int]], seeds: Sequence[int]
               ) -> list[Image.Image]:
        """One RGB image per caption. A model may also set `last_reports` (one dict per image, diagnostics
        that caption_refine copies into provenance)."""


ReconstructorFactory = Callable[[Any, torch.device, torch.dtype], TextToImage]
RECONSTRUCTORS: dict[str, ReconstructorFactory] = {}
BUILTIN_MODULES = {"shapeworld": "synthesis_torch.shapeworld_sim"}


def register_reconstructor(name: str, factory: ReconstructorFactory) -> None:
    RECONSTRUCTORS[name] = factory


def build_reconstructor(config: Any, device: torch.device, dtype: torch.dtype) -> TextToImage:
    name = config.t2i.get("name", "qwen_image")
    if config.t2i.get("plugin"):
        importlib.import_module(config.t2i.plugin)  # registers third-party text-to-image models
    if name not in RECONSTRUCTORS and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
    if name not in RECONSTRUCTORS:
        raise KeyError(f"unknown text-to-image model {name!r}; registered: {sorted(RECONSTRUCTORS)}")
    return RECONSTRUCTORS[name](config, device, dtype)


class Reconstructor:
    """Stage 1's text-to-image model: renders each caption at the original image's aspect ratio."""

    name = "qwen_image"

    def __init__(self, path: str, *, device: torch.device, dtype: torch.dtype, offload: str, steps: int,
                 true_cfg_scale: float, negative_prompt: str, area: int, max_sequence_length: int,
                 batch_size: int):
        from diffusers import QwenImagePipeline

        self.path = path
        self.pipe = load_pipeline(QwenImagePipeline, path, device=device, dtype=dtype, offload=offload)
        self.steps, self.true_cfg_scale, self.negative_prompt = steps, true_cfg_scale, negative_prompt
        self.area, self.max_sequence_length, self.batch_size = area, max_sequence_length, batch_size
        # Latents are 2x2-packed after the VAE's downsampling, so sizes must be multiples of twice it.
        self.multiple = self.pipe.vae_scale_factor * 2

    @classmethod
    def from_config(cls, config: Any, device: torch.device, dtype: torch.dtype) -> "Reconstructor":
        t = config.t2i
        return cls(config.models.t2i, device=device, dtype=dtype, offload=t.offload, steps=t.steps,
                   true_cfg_scale=t.true_cfg_scale, negative_prompt=t.negative_prompt, area=t.area,
                   max_sequence_length=t.max_sequence_length, batch_size=t.batch_size)

    def settings(self) -> dict[str, Any]:
        return {"steps": self.steps, "true_cfg_scale": self.true_cfg_scale, "area": self.area,
                "negative_prompt": self.negative_prompt, "max_sequence_length": self.max_sequence_length}

    def size_for(self, image: Image.Image) -> tuple[int, int]:
        return output_size(image.width, image.height, self.area, self.multiple)

    def _truncate(self, caption: str) -> str:
        # The pipeline cuts the embeddings at max_sequence_length tokens anyway; cutting the text keeps the
        # tokenizer from building huge inputs for runaway captions.
        ids = self.pipe.tokenizer(caption, add_special_tokens=False).input_ids[:self.max_sequence_length]
        return self.pipe.tokenizer.decode(ids)

    @torch.inference_mode()
    def render(self, captions: Sequence[str], sizes: Sequence[tuple[int, int]], seeds: Sequence[int]
               ) -> list[Image.Image]:
        """One image per caption; only captions of the same output size share a pipeline call."""
        out: list[Image.Image | None] = [None] * len(captions)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        for (w, h), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                images = self.pipe(
                    prompt=[self._truncate(captions[i]) for i in batch],
                    negative_prompt=[self.negative_prompt] * len(batch) if self.true_cfg_scale > 1 else None,
                    true_cfg_scale=self.true_cfg_scale, width=w, height=h, num_inference_steps=self.steps,
                    max_sequence_length=self.max_sequence_length,
                    generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in batch]).images
                for i, image in zip(batch, images):
                    out[i] = image.convert("RGB")
        return out  # type: ignore[return-value]


register_reconstructor(Reconstructor.name, Reconstructor.from_config)
