"""Device, dtype and version helpers shared by both stages."""

from __future__ import annotations

import platform
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" = the first CUDA device if there is one (set CUDA_VISIBLE_DEVICES per job), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" = bfloat16 on CUDA (the released weights' dtype), float32 on CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def versions() -> dict[str, Any]:
    import diffusers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "diffusers": diffusers.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
