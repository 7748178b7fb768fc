"""`viper-synth rerender`: the stage-1 reconstructions of existing caption_refine records, drawn again from what
each record's provenance keeps (text-to-image model, caption, size, seed, settings). Synthesis jobs do not store
the reconstructions; `viper demo`'s report shows them beside the originals."""

from __future__ import annotations

from pathlib import Path

import torch

from synthesis_torch.diffusion import Reconstructor
from viper_common import records


def rerender(records_dir: str | Path, out_dir: str | Path, limit: int) -> list[Path]:
    """reconstruction_{i}.png in `out_dir` for the first `limit` caption_refine records (CPU, float32)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recon, written = None, []
    for i, record in enumerate(records.first_records(records_dir, "caption_refine", limit)):
        p = record.provenance
        settings = p["t2i_settings"]
        if recon is None:
            recon = Reconstructor(p["models"]["t2i"], device=torch.device("cpu"), dtype=torch.float32, offload="none",
                                  steps=settings["steps"], true_cfg_scale=settings["true_cfg_scale"],
                                  negative_prompt=settings["negative_prompt"], area=settings["area"],
                                  max_sequence_length=settings["max_sequence_length"], batch_size=1)
        path = out_dir / f"reconstruction_{i}.png"
        recon.render([record.caption], [tuple(p["reconstruction_size"])], [p["seeds"]["t2i"]])[0].save(path)
        written.append(path)
    return written
