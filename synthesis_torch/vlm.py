"""The synthesising VLM: any Hugging Face Qwen2.5-VL directory (the Instruct release, or a policy exported
by `viper convert orbax-to-hf`), driven through transformers' batched `generate`.

Why the details matter:
- Left padding: batched generation appends new tokens at the right end of every row.
- `mm_token_type_ids`: the processor returns it and we pass everything the processor returns to
  `generate`. Without it transformers 5.x silently uses 1D positions instead of Qwen's multimodal RoPE.
- Greedy decoding by default (temperature 0): the output of an image does not depend on which other
  images share its batch (up to floating-point effects of padding), so restarts and re-sharding reproduce
  it. With temperature > 0 the RNG is seeded per batch from the first item's seed: reproducible for the
  same batches. A resumed job re-forms the same chunks and batches (it restarts at the first uncommitted
  chunk), so this holds across restarts, but not across changes of chunk_size, batch_size or sharding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

Prompt = tuple[Sequence[Image.Image], str]  # images shown (in order), then the text


class VLM:
    def __init__(self, path: str, *, device: torch.device, dtype: torch.dtype, min_pixels: int = 0,
                 max_pixels: int = 0, attn_implementation: str = "sdpa"):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.path, self.device = path, device
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        # device_map loads the weights straight onto the device (no full copy in host memory first).
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, device_map=str(device)).eval()
        # Resize range for the vision tower; 0 keeps what the directory's processor config says.
        self.size = None
        if min_pixels or max_pixels:
            size = self.processor.image_processor.size
            self.size = {"shortest_edge": min_pixels or size.shortest_edge,
                         "longest_edge": max_pixels or size.longest_edge}

    @classmethod
    def from_config(cls, config: Any, device: torch.device, dtype: torch.dtype) -> "VLM":
        return cls(config.models.vlm, device=device, dtype=dtype, min_pixels=config.vlm.min_pixels,
                   max_pixels=config.vlm.max_pixels, attn_implementation=config.vlm.attn_implementation)

    def _render(self, images: Sequence[Image.Image], text: str) -> str:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0) -> list[str]:
        texts = [self._render(images, text) for images, text in prompts]
        images = [im for ims, _ in prompts for im in ims]
        kwargs = {"size": self.size} if self.size and images else {}
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt", **kwargs)
        if images and "mm_token_type_ids" not in inputs:
            raise RuntimeError("the processor returned no mm_token_type_ids: Qwen2.5-VL would use 1D RoPE")
        inputs = inputs.to(self.device)
        sampling: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if temperature > 0:
            torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                  pad_token_id=self.processor.tokenizer.pad_token_id, **sampling)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def generate(self, prompts: Sequence[Prompt], *, batch_size: int, seeds: Sequence[int], **kwargs
                 ) -> list[str]:
        """Raw completions for `prompts`, `batch_size` at a time (`seeds[i]` is prompt i's seed)."""
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            out.extend(self.generate_batch(prompts[start:start + batch_size], seed=seeds[start], **kwargs))
        return out
