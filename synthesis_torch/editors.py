"""Image editors for stage 2, behind a small protocol and a registry.

An editor turns (image, instruction, seed) into an edited image. The default is diffusers'
`QwenImageEditPipeline` (Qwen-Image-Edit), loaded by path. The paper used OmniGen2, which is not in diffusers
(it lives in VectorSpaceLab/OmniGen2 and is not on PyPI); to use it, or any other editor, write a module
that calls `register_editor("omnigen2", factory)` and name it in `config.editor.plugin`, then set
`config.editor.name = "omnigen2"`. A factory takes (config, device, dtype) and returns an `Editor`.

Two deliberate deviations from calling `QwenImageEditPipeline` naively, both documented in place:
- mm_token_type_ids: the Edit pipelines of diffusers >= 0.38 do not pass it to their Qwen2.5-VL text encoder
  (diffusers issue #14194), so with transformers 5.x the encoder silently uses 1D RoPE over the image
  tokens. We replace the pipeline's prompt encoder on our instance with the same code plus that argument.
- condition area: the pipeline conditions on the input image resized to a hard-coded 1024*1024 pixels.
  `editor.condition_area` (0 = keep) changes that for the duration of our call; only the tiny CPU demo
  uses it, because a tiny random editor at 1 megapixel takes tens of seconds per edit on a CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any, Callable, Iterator, Protocol

import torch
from PIL import Image

from synthesis_torch.diffusion import load_pipeline, output_size


class Editor(Protocol):
    name: str

    def settings(self) -> dict[str, Any]:
        """Model paths and settings, recorded in every record's provenance."""

    def edit(self, image: Image.Image, instruction: str, seed: int) -> Image.Image:
        """The edited image (RGB). May raise EditorError; may set `last_report` (a dict of diagnostics
        about this call, which stage 2 copies into the operation's log)."""


class EditorError(Exception):
    """The editor cannot use this input (e.g. the ShapeWorld simulator got an image without its scene).
    Stage 2 counts it as the reject "editor_error" instead of stopping the job; other errors still stop it."""


EditorFactory = Callable[[Any, torch.device, torch.dtype], Editor]
EDITORS: dict[str, EditorFactory] = {}
BUILTIN_MODULES = {"shapeworld": "synthesis_torch.shapeworld_sim"}  # imported on first use


def register_editor(name: str, factory: EditorFactory) -> None:
    EDITORS[name] = factory


def build_editor(config: Any, device: torch.device, dtype: torch.dtype) -> Editor:
    if config.editor.get("plugin"):
        importlib.import_module(config.editor.plugin)  # registers third-party editors
    if config.editor.name not in EDITORS and config.editor.name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[config.editor.name])
    if config.editor.name not in EDITORS:
        raise KeyError(f"unknown editor {config.editor.name!r}; registered: {sorted(EDITORS)}")
    return EDITORS[config.editor.name](config, device, dtype)


def _prompt_embeds_with_mm_types(self: Any, prompt: Any, image: Any = None, device: Any = None,
                                 dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """QwenImageEditPipeline._get_qwen_prompt_embeds (diffusers 0.42.1) plus `mm_token_type_ids`."""
    device = device or self._execution_device
    dtype = dtype or self.text_encoder.dtype
    prompt = [prompt] if isinstance(prompt, str) else prompt
    drop_idx = self.prompt_template_encode_start_idx
    txt = [self.prompt_template_encode.format(e) for e in prompt]
    model_inputs = self.processor(text=txt, images=image, padding=True, return_tensors="pt").to(device)
    outputs = self.text_encoder(
        input_ids=model_inputs["input_ids"], attention_mask=model_inputs["attention_mask"],
        pixel_values=model_inputs.get("pixel_values"), image_grid_thw=model_inputs.get("image_grid_thw"),
        mm_token_type_ids=model_inputs.get("mm_token_type_ids"), output_hidden_states=True)
    hidden = outputs.hidden_states[-1]
    split = [e[drop_idx:] for e in self._extract_masked_hidden(hidden, model_inputs["attention_mask"])]
    max_len = max(e.size(0) for e in split)
    embeds = torch.stack([torch.cat([u, u.new_zeros(max_len - u.size(0), u.size(1))]) for u in split])
    mask = torch.stack([torch.cat([torch.ones(u.size(0), dtype=torch.long, device=u.device),
                                   torch.zeros(max_len - u.size(0), dtype=torch.long, device=u.device)])
                        for u in split])
    return embeds.to(dtype=dtype, device=device), mask


@contextlib.contextmanager
def _condition_area(module: Any, area: int) -> Iterator[None]:
    """Temporarily replaces the pipeline module's `calculate_dimensions(1024*1024, ...)` area."""
    if not area:
        yield
        return
    original = module.calculate_dimensions
    module.calculate_dimensions = lambda _area, ratio: original(area, ratio)
    try:
        yield
    finally:
        module.calculate_dimensions = original


class QwenImageEditor:
    name = "qwen_image_edit"

    def __init__(self, path: str, *, device: torch.device, dtype: torch.dtype, offload: str, steps: int,
                 true_cfg_scale: float, negative_prompt: str, area: int, condition_area: int):
        from diffusers import QwenImageEditPipeline
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

        self.path = path
        self.pipe = load_pipeline(QwenImageEditPipeline, path, device=device, dtype=dtype, offload=offload)
        self.pipe._get_qwen_prompt_embeds = types.MethodType(_prompt_embeds_with_mm_types, self.pipe)
        self._module = pipeline_qwenimage_edit
        self.steps, self.true_cfg_scale, self.negative_prompt = steps, true_cfg_scale, negative_prompt
        self.area, self.condition_area = area, condition_area
        self.multiple = self.pipe.vae_scale_factor * 2

    @classmethod
    def from_config(cls, config: Any, device: torch.device, dtype: torch.dtype) -> "QwenImageEditor":
        e = config.editor
        return cls(config.models.editor, device=device, dtype=dtype, offload=e.offload, steps=e.steps,
                   true_cfg_scale=e.true_cfg_scale, negative_prompt=e.negative_prompt, area=e.area,
                   condition_area=e.condition_area)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "steps": self.steps, "area": self.area,
                "true_cfg_scale": self.true_cfg_scale, "negative_prompt": self.negative_prompt,
                "condition_area": self.condition_area or 1024 * 1024}

    @torch.inference_mode()
    def edit(self, image: Image.Image, instruction: str, seed: int) -> Image.Image:
        w, h = output_size(image.width, image.height, self.area, self.multiple)
        with _condition_area(self._module, self.condition_area):
            result = self.pipe(
                image=image, prompt=instruction, width=w, height=h, num_inference_steps=self.steps,
                true_cfg_scale=self.true_cfg_scale,
                negative_prompt=self.negative_prompt if self.true_cfg_scale > 1 else None,
                generator=torch.Generator("cpu").manual_seed(seed))
        return result.images[0].convert("RGB")


register_editor(QwenImageEditor.name, QwenImageEditor.from_config)
