"""Stage 1, Caption Self-Refining data: image -> caption C_g -> reconstruction from C_g alone -> the VLM
compares original and reconstruction and lists C_g's errors and omissions -> `caption_refine` record.

The record's provenance also holds the refined description stage 2 picks its hard entities from: with
`vlm.rewrite_refined` (default) the VLM, shown the image, rewrites C_g with its corrections into one
description (prompt "refine"); otherwise, or when the rewrite is unusable (empty, or shorter than
`filter.min_caption_words` under strict parsing; counted as `refine_fallback`), C_g with the corrections
appended. `provenance.refined_by` says which ("vlm" or "appended").

Per chunk of images, each model runs once over the whole chunk (captions for all images, then all
reconstructions, then all critiques), so with CPU offload every pipeline component moves to the GPU once
per chunk rather than once per image.

Rejects (counted by reason in the job manifest): the input checks of `inputs.load_image` (unreadable,
unsupported_format, too_small, too_large, bad_aspect), `empty_caption` (no usable caption text) and
`no_corrections` (no critique sentence survived `parsing.parse_corrections`). Dropped sentences are
counted separately (`dropped_by_reason`), and so are the flags a text-to-image model may report per image
(`t2i_<flag>`, e.g. the ShapeWorld simulator's `t2i_no_objects`: it read no object from the caption and drew
a background only). Such a sample is kept: a real text-to-image model would also draw something, and the
pipeline cannot know better.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from PIL import Image

from synthesis_torch import parsing
from synthesis_torch.config import csv
from synthesis_torch.diffusion import TextToImage, build_reconstructor
from synthesis_torch.inputs import BadImage, ImageInput, Reject, derive_seed, list_images, load_image, select_shard
from synthesis_torch.jobs import ChunkResult, Job, run_job
from synthesis_torch.runtime import resolve_device, resolve_dtype, versions
from synthesis_torch.vlm import VLM
from viper_common.prompts import SYNTHESIS_PROMPTS, merged
from viper_common.records import ViperRecord

TASK = "caption_refine"
MAX_RAW_CHARS = 4000  # raw model outputs kept in provenance for auditing, truncated


def sentence_rules(config: Any) -> parsing.SentenceRules:
    f = config.filter
    return parsing.SentenceRules(lenient=f.lenient, min_words=f.min_words, max_chars=f.max_chars,
                                 min_alpha_ratio=f.min_alpha_ratio)


def vlm_settings(config: Any) -> dict[str, Any]:
    v = config.vlm
    return {"temperature": v.temperature, "top_p": v.top_p, "repetition_penalty": v.repetition_penalty}


class CaptionRefiner:
    """Holds the models of stage 1; `process` turns a chunk of image inputs into records and rejects."""

    def __init__(self, config: Any, vlm: VLM | None = None, reconstructor: TextToImage | None = None):
        self.config = config
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        self.vlm = vlm or VLM.from_config(config, device, dtype)
        self.recon = reconstructor or build_reconstructor(config, device, dtype)
        self.prompts = merged(SYNTHESIS_PROMPTS, config.prompts.to_dict())
        self.rules = sentence_rules(config)

    def _generate(self, prompts: list, keys: list[str], purpose: str, max_new_tokens: int) -> list[str]:
        seeds = [derive_seed(self.config.seed, k, purpose) for k in keys]
        return self.vlm.generate(prompts, batch_size=self.config.vlm.batch_size, seeds=seeds,
                                 max_new_tokens=max_new_tokens, **vlm_settings(self.config))

    def process(self, chunk: list[ImageInput]) -> ChunkResult:
        cfg = self.config
        result = ChunkResult([], [])
        loaded: list[tuple[ImageInput, bytes, Image.Image]] = []
        for item in chunk:
            try:
                data, image = load_image(item.path, min_side=cfg.inputs.min_side, max_pixels=cfg.inputs.max_pixels,
                                         max_aspect=cfg.inputs.max_aspect, max_bytes=cfg.inputs.max_bytes)
                loaded.append((item, data, image))
            except BadImage as e:
                result.rejects.append(Reject(item.key, item.rel, e.reason, e.detail))
        if not loaded:
            return result

        # 1. The VLM's own detailed caption C_g.
        raw_captions = self._generate([([im], self.prompts["caption"]) for _, _, im in loaded],
                                      [it.key for it, _, _ in loaded], "caption", cfg.vlm.max_new_tokens_caption)
        kept = []
        for (item, data, image), raw in zip(loaded, raw_captions):
            caption = parsing.clean_caption(raw)
            short = not self.rules.lenient and len(caption.split()) < cfg.filter.min_caption_words
            if not caption or short:
                result.rejects.append(Reject(item.key, item.rel, "empty_caption", raw[:200]))
            else:
                kept.append((item, data, image, caption))
        if not kept:
            return result

        # 2. Reconstruction from the caption alone, at the original's aspect ratio.
        sizes = [self.recon.size_for(im) for _, _, im, _ in kept]
        t2i_seeds = [derive_seed(cfg.seed, it.key, "t2i") for it, _, _, _ in kept]
        recons = self.recon.render([c for *_, c in kept], sizes, t2i_seeds)
        # Optional per-image diagnostics of the t2i model (the ShapeWorld simulator says whether it could
        # use the caption); counted in the manifest's dropped_by_reason under "t2i_<key>" when flagged.
        reports = getattr(self.recon, "last_reports", None) or [None] * len(kept)
        for report in reports:
            for flag in (report or {}).get("flags", ()):
                result.dropped[f"t2i_{flag}"] += 1

        # 3. The VLM compares original and reconstruction and lists the caption's errors and omissions.
        prompts = [([im, rec], self.prompts["critique"].format(caption=c)) for (_, _, im, c), rec in zip(kept, recons)]
        raw_critiques = self._generate(prompts, [it.key for it, *_ in kept], "critique",
                                       cfg.vlm.max_new_tokens_critique)

        parsed = []
        for (item, data, image, caption), size, seed, raw, report in zip(kept, sizes, t2i_seeds, raw_critiques,
                                                                          reports):
            corrections, dropped = parsing.parse_corrections(raw, self.rules, cfg.filter.max_corrections)
            result.dropped.update(dropped)
            if not corrections:
                detail = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "empty output"
                result.rejects.append(Reject(item.key, item.rel, "no_corrections", detail))
                continue
            parsed.append((item, data, image, caption, size, seed, raw, report, corrections, dropped))

        # 4. The refined description (stage 2's input): the VLM's rewrite, or the caption + corrections.
        rewrites: list[str | None] = [None] * len(parsed)
        if cfg.vlm.rewrite_refined and parsed:
            prompts = [([image], self.prompts["refine"].format(
                caption=caption, corrections="\n".join(f"- {c}" for c in corrections)))
                for _, _, image, caption, *_, corrections, _ in parsed]
            rewrites = self._generate(prompts, [p[0].key for p in parsed], "refine", cfg.vlm.max_new_tokens_refine)

        for (item, data, image, caption, size, seed, raw, report, corrections, dropped), raw_refine in zip(parsed,
                                                                                                       rewrites):
            refined, refined_by = parsing.refined_description(caption, corrections), "appended"
            if raw_refine is not None:
                rewrite = parsing.clean_caption(raw_refine)
                short = not self.rules.lenient and len(rewrite.split()) < cfg.filter.min_caption_words
                if rewrite and not short:
                    refined, refined_by = rewrite, "vlm"
                else:
                    result.dropped["refine_fallback"] += 1
            rec = ViperRecord(
                id=f"csr-{item.key}", task=TASK, images=(data,), caption=caption, truth=tuple(corrections),
                provenance={
                    "source": str(item.path), "source_rel": item.rel, "image_key": item.key,
                    "image_size": [image.width, image.height], "reconstruction_size": list(size),
                    "models": {"vlm": self.vlm.path, "t2i": self.recon.path},
                    "seeds": {"base": cfg.seed, "t2i": seed,
                              "vlm": derive_seed(cfg.seed, item.key, "caption") if cfg.vlm.temperature > 0 else None},
                    "vlm_settings": vlm_settings(cfg), "t2i_settings": self.recon.settings(),
                    # Stage 2 reads this: the VLM's rewrite of the caption with its corrections, or the caption
                    # followed by its corrections (refined_by: "vlm" | "appended").
                    "refined_description": refined, "refined_by": refined_by,
                    **({"raw_refine": raw_refine[:MAX_RAW_CHARS]} if raw_refine is not None else {}),
                    "raw_critique": raw[:MAX_RAW_CHARS], "dropped": dict(dropped), "lenient": self.rules.lenient,
                    **({"t2i_report": report} if report is not None else {})})
            result.records.append(rec)
            result.keys[rec.id] = item.key
        return result


def run(config: Any, image_dir: str | Path, out_dir: str | Path, shard_index: int = 0, num_shards: int = 1,
        limit: int | None = None, refiner: CaptionRefiner | None = None) -> dict[str, Any]:
    """Runs (or resumes) one job shard of stage 1 and returns its manifest."""
    items = select_shard(list_images(image_dir, csv(config.inputs.extensions)), shard_index, num_shards)
    items = items[:limit] if limit else items
    job = Job(out_dir, TASK, shard_index, num_shards)
    state: dict[str, CaptionRefiner] = {}

    def process(chunk: list[ImageInput]) -> ChunkResult:
        if "refiner" not in state:  # models load only if there is work left
            state["refiner"] = refiner or CaptionRefiner(config)
        return state["refiner"].process(chunk)

    extra = {"source": str(image_dir), "models": {"vlm": config.models.vlm, "t2i": config.models.t2i},
             "settings": config.to_dict(), "versions": versions(),
             "input_counts": dict(collections.Counter(Path(x.rel).suffix.lower() for x in items))}
    return run_job(job, items, process, config.chunk_size, extra)
