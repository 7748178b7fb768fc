"""Stage 2, Visual-Operation Predicting data: stage-1 records -> hard entities of the refined description
(entities.py) -> typed edit instructions from the VLM (parsing.parse_edit_ops) -> the editor applies them
(editors.py) -> difference band (diffband.py) -> `visual_ops` record (original, edited, operation sentences).

Editing modes (`editor.mode`):
- "sequential" (default): one editor call per operation, each applied to the previous result. With
  `diff.per_op`, an operation whose own change is below the band is dropped from the ground truth (the
  editor ignored it; its output is discarded so re-generation drift does not accumulate) and an operation
  that changed everything rejects the sample. Costs one editor call per operation, but the truth only
  lists operations that visibly happened.
- "combined": one editor call with all instructions; only the final band check applies.
Finally the original and the final image must differ within the band.

With `ops.verify`, the VLM checks every edit that passed the band (prompt "verify_edit": the image before
and after it, does the second show the instruction's result? anything but "yes" is a no). Sequential: a
denied edit is dropped from the truth and its output discarded, as an ignored one (counted
`op_not_verified`); combined: one denied instruction rejects the sample. A pixel band cannot tell an edit
of the wrong object from the right one; the check can.

Rejects: unreadable (stage-1 image bytes do not decode), no_entities, no_valid_ops, editor_error (the
editor raised EditorError: it cannot use this input), edit_no_change, edit_too_large, edit_not_verified
(every edit denied by the check, or one in combined mode).
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from synthesis_torch import diffband, parsing
from synthesis_torch.caption_refine import MAX_RAW_CHARS, sentence_rules, vlm_settings
from synthesis_torch.config import csv
from synthesis_torch.editors import Editor, EditorError, build_editor
from synthesis_torch.entities import select_entities
from synthesis_torch.inputs import RecordInput, Reject, derive_seed, list_record_inputs, read_records, select_shard
from synthesis_torch.jobs import ChunkResult, Job, run_job
from synthesis_torch.runtime import resolve_device, resolve_dtype, versions
from synthesis_torch.vlm import VLM
from viper_common.prompts import SYNTHESIS_PROMPTS, merged
from viper_common.records import ViperRecord

TASK = "visual_ops"


def png_bytes(image: Image.Image) -> bytes:
    # Text metadata the editor attached (the ShapeWorld simulator's scene) is kept, so edits chain and the
    # world's diagnostics can read the result; the trainer decodes only the pixels.
    text = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            text.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=text)  # lossless: the edit's fine details are the point of the sample
    return buf.getvalue()


class OpsSynthesizer:
    """Holds the models of stage 2; `process` turns a chunk of stage-1 records into records and rejects."""

    def __init__(self, config: Any, vlm: VLM | None = None, editor: Editor | None = None):
        if config.editor.mode not in ("sequential", "combined"):
            raise ValueError(f"editor.mode must be sequential|combined, got {config.editor.mode!r}")
        self.config = config
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        self.vlm = vlm or VLM.from_config(config, device, dtype)
        self.editor = editor or build_editor(config, device, dtype)
        self.prompts = merged(SYNTHESIS_PROMPTS, config.prompts.to_dict())
        self.rules = dataclasses.replace(sentence_rules(config), min_words=config.ops.min_words)
        self.types = csv(config.ops.types)

    def _band(self, a: Image.Image, b: Image.Image) -> tuple[diffband.Difference, str | None]:
        d = self.config.diff
        diff = diffband.image_difference(a, b, d.size, d.pixel_threshold)
        return diff, diffband.band_verdict(diff, d.metric, d.min, d.max)

    def _verify(self, before: Image.Image, after: Image.Image, instruction: str, key: str, purpose: str
                ) -> tuple[bool, str]:
        """(the VLM says `after` shows `instruction` applied to `before`, its raw answer)."""
        cfg = self.config
        prompt = ([before, after], self.prompts["verify_edit"].format(instruction=instruction))
        (raw,) = self.vlm.generate([prompt], batch_size=1, seeds=[derive_seed(cfg.seed, key, purpose)],
                                   max_new_tokens=cfg.vlm.max_new_tokens_verify, **vlm_settings(cfg))
        return parsing.parse_yes_no(raw) is True, raw[:200]

    def _apply(self, image: Image.Image, ops: list[parsing.EditOp], key: str
               ) -> tuple[Image.Image, list[dict[str, Any]], str | None]:
        """Runs the editor; returns the final image, a log entry per operation, and a reject reason."""
        cfg = self.config
        if cfg.editor.mode == "combined":
            seed = derive_seed(cfg.seed, key, "edit")
            instruction = " ".join(op.sentence for op in ops)
            out = self.editor.edit(image, instruction, seed)
            report = getattr(self.editor, "last_report", None)
            log = [{"type": op.type, "instruction": op.instruction, "kept": True, "seed": seed,
                    **({"editor_report": report} if report is not None else {})} for op in ops]
            reason = None
            if cfg.ops.verify and self._band(image, out)[1] is None:  # outside the band: rejected anyway
                for k, (op, entry) in enumerate(zip(ops, log)):
                    entry["verified"], entry["verify_answer"] = self._verify(image, out, op.instruction, key,
                                                                             f"verify{k}")
                    if not entry["verified"]:
                        entry["kept"], entry["verdict"], reason = False, "not_verified", "edit_not_verified"
            return out, log, reason
        current, log = image, []
        for k, op in enumerate(ops):
            seed = derive_seed(cfg.seed, key, f"edit{k}")
            out = self.editor.edit(current, op.instruction, seed)
            report = getattr(self.editor, "last_report", None)
            diff, verdict = self._band(current, out)
            verdict = verdict if cfg.diff.per_op else None
            entry: dict[str, Any] = {}
            if verdict is None and cfg.ops.verify:
                entry["verified"], entry["verify_answer"] = self._verify(current, out, op.instruction, key,
                                                                         f"verify{k}")
                verdict = None if entry["verified"] else "not_verified"
            log.append({"type": op.type, "instruction": op.instruction, "seed": seed,
                        "kept": verdict is None, "verdict": verdict, **diff.as_dict(), **entry,
                        **({"editor_report": report} if report is not None else {})})
            if verdict == "too_large":
                return out, log, "edit_too_large"
            if verdict is None:
                current = out
        return current, log, None

    def process(self, chunk: list[RecordInput]) -> ChunkResult:
        cfg = self.config
        result = ChunkResult([], [])
        found = {ref.key: rec for ref, rec in read_records(chunk)}
        todo = []  # (ref, source record, image, description, entity names)
        for ref in chunk:
            rec = found[ref.key]
            source = str(rec.provenance.get("source", rec.id))
            try:
                image = Image.open(io.BytesIO(rec.images[0]))
                image = image.convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decoder error means the same: unusable input
                result.rejects.append(Reject(ref.key, source, "unreadable", f"{type(e).__name__}: {e}"))
                continue
            description = str(rec.provenance.get("refined_description") or
                              parsing.refined_description(rec.caption or "", rec.truth))
            entities = select_entities(description, cfg.ops.max_entities, cfg.ops.min_entity_score)
            names = [e.describe() for e in entities]
            if not names and cfg.ops.fallback_entities:
                names = [cfg.ops.fallback_entities]
            if not names:
                result.rejects.append(Reject(ref.key, source, "no_entities", description[:200]))
                continue
            todo.append((ref, rec, image, description, entities, names))
        if not todo:
            return result

        template = self.prompts["edit_instructions"]
        prompts = [([image] if cfg.vlm.show_image_for_edits else [],
                    template.format(description=description, num_ops=cfg.ops.num_ops,
                                    entities="; ".join(f'"{n}"' for n in names)))
                   for _, _, image, description, _, names in todo]
        seeds = [derive_seed(cfg.seed, ref.key, "instructions") for ref, *_ in todo]
        raws = self.vlm.generate(prompts, batch_size=cfg.vlm.batch_size, seeds=seeds,
                                 max_new_tokens=cfg.vlm.max_new_tokens_edit, **vlm_settings(cfg))

        for (ref, rec, image, description, entities, names), raw in zip(todo, raws):
            source = str(rec.provenance.get("source", rec.id))
            ops, dropped = parsing.parse_edit_ops(raw, self.rules, self.types, cfg.ops.num_ops)
            result.dropped.update(dropped)
            if not ops:
                detail = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "empty output"
                result.rejects.append(Reject(ref.key, source, "no_valid_ops", detail))
                continue
            try:
                edited, log, reason = self._apply(image, ops, ref.key)
            except EditorError as e:
                result.rejects.append(Reject(ref.key, source, "editor_error", str(e)[:200]))
                continue
            kept = [op for op, entry in zip(ops, log) if entry["kept"]]
            ignored = sum(entry.get("verdict") == "no_change" for entry in log)
            if ignored:
                result.dropped["op_no_change"] += ignored
            denied = sum(entry.get("verdict") == "not_verified" for entry in log)
            if denied and cfg.editor.mode == "sequential":
                result.dropped["op_not_verified"] += denied
            total, verdict = self._band(image, edited)
            if reason is None and not kept and denied:
                reason = "edit_not_verified"
            elif reason is None and (not kept or verdict == "no_change"):
                reason = "edit_no_change"
            elif reason is None and verdict == "too_large":
                reason = "edit_too_large"
            if reason:
                result.rejects.append(Reject(ref.key, source, reason, json.dumps(total.as_dict())))
                continue
            out = ViperRecord(
                id=f"vop-{ref.key}", task=TASK, images=(rec.images[0], png_bytes(edited)),
                truth=tuple(op.sentence for op in kept),
                provenance={
                    "source": source, "image_key": ref.key, "source_record": rec.id, "source_shard": str(ref.shard),
                    "description": description, "description_by": rec.provenance.get("refined_by", "appended"),
                    "entities": [dataclasses.asdict(e) for e in entities],
                    "entity_names": names, "ops": log, **total.as_dict(), "mode": cfg.editor.mode,
                    "models": {"vlm": self.vlm.path, "editor": self.editor.settings()},
                    "seeds": {"base": cfg.seed, "edits": [entry["seed"] for entry in log]},
                    "vlm_settings": vlm_settings(cfg),
                    "diff_band": {"metric": cfg.diff.metric, "min": cfg.diff.min, "max": cfg.diff.max},
                    "raw_instructions": raw[:MAX_RAW_CHARS], "dropped": dict(dropped), "lenient": self.rules.lenient})
            result.records.append(out)
            result.keys[out.id] = ref.key
        return result


def run(config: Any, record_paths: list[str | Path], out_dir: str | Path, shard_index: int = 0, num_shards: int = 1,
        limit: int | None = None, synthesizer: OpsSynthesizer | None = None) -> dict[str, Any]:
    """Runs (or resumes) one job shard of stage 2 over stage-1 record shards; returns its manifest."""
    items = select_shard(list_record_inputs(record_paths), shard_index, num_shards)
    items = items[:limit] if limit else items
    job = Job(out_dir, TASK, shard_index, num_shards)
    state: dict[str, OpsSynthesizer] = {}

    def process(chunk: list[RecordInput]) -> ChunkResult:
        if "synth" not in state:  # models load only if there is work left
            state["synth"] = synthesizer or OpsSynthesizer(config)
        return state["synth"].process(chunk)

    extra = {"source": [str(p) for p in record_paths],
             "models": {"vlm": config.models.vlm, "editor": config.models.editor, "editor_name": config.editor.name},
             "settings": config.to_dict(), "versions": versions()}
    return run_job(job, items, process, config.chunk_size, extra)
