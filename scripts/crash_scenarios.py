"""The commands `scripts/crash_sweep.py` and tests/test_kill_points.py kill and resume, each with tiny offline
inputs (the tests' own: viper_jax.tiny's records and model, synthesis_torch.tiny_models, the demo's photos), the
command line of one run into a fresh output folder, and a digest of everything a run leaves that must be the
same after a kill and a resume as after an uninterrupted run:

- trainers (`viper train`, `viper sft`): every leaf of the final checkpoint's params and opt_state (bytes),
  its train_meta and data_state, the list of checkpoint steps (no temporary or half-written step left), every
  metrics row (each step exactly once, timings left out);
- synthesis (`viper-synth caption-refine`, `visual-ops`): every file of each job folder (no temporary file, no
  orphan shard), each shard's records (header and image bytes), each sidecar and the manifest (timings and the
  creation time left out);
- `viper convert orbax-to-hf`: every file of the export, bytes;
- `viper loop`: the round's status (every step done), its synthesis, its training and its export as above.

Paths of the run's own folder are replaced by `<out>` before hashing (records and status name the folders).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Keys of metrics rows, sidecars and manifests that measure time: they differ between any two runs.
VOLATILE = re.compile(r"time|seconds|_per_s|^created$")

TRAIN_FLAGS = ("--config.rl.prompts_per_step=4", "--config.rl.group_size=4", "--config.rl.num_minibatches=2",
               "--config.rollout.max_new_tokens=16", "--config.logging.progress_bar=false",
               "--config.stages.caption_refine.steps=3", "--config.stages.visual_ops.steps=2",
               "--config.checkpoint.every_steps=2", "--config.stages.caption_refine.reward=toy_letters",
               "--config.stages.visual_ops.reward=toy_letters", "--config.optim.learning_rate=3e-2",
               # One prompt length (the tiny records fit): one program of each kind to compile, not three.
               "--config.data.auto_buckets=0", "--config.data.length_buckets=(384,)")
SFT_FLAGS = ("--config.logging.progress_bar=false", "--config.logging.tensorboard=false", "--config.steps=8",
             "--config.checkpoint.every_steps=3", "--config.data.length_buckets=(384,)")
SYNTH_FLAGS = ("--config.chunk_size=1",)
LOOP_TRAIN = ("--config.stages.caption_refine.steps=1", "--config.stages.visual_ops.steps=1")
NUM_PHOTOS = 3


def env_for(root: Path) -> dict[str, str]:
    """The environment of every run: CPU JAX with a shared compilation cache (XLA's optimisation level 0:
    about 2.5x faster compiles here; every compared run uses it), one torch thread, no network."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               VIPER_TINY_DATA=str(root / "grpo_data"), VIPER_SFT_DATA=str(root / "sft_data"),
               VIPER_TINY_DIR=str(root / "synth_models"), VIPER_JAX_CACHE_DIR=str(root / "jax_cache"))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    for name in ("VIPER_KILL_AT", "VIPER_KILL_LOG"):
        env.pop(name, None)
    return env


def _run(cmd: list[str], root: Path, what: str) -> None:
    out = subprocess.run(cmd, env=env_for(root), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"preparing {what} failed ({out.returncode}): {(out.stdout + out.stderr)[-3000:]}")


# ------------------------------------------------------------------------------------------------ inputs

def prepare(root: Path, command: str) -> None:
    """Writes the inputs `command` needs under `root` (once; later calls find them)."""
    root.mkdir(parents=True, exist_ok=True)
    if command == "train" and not (root / "grpo_data").exists():
        _run([PY, "-c", f"from viper_jax.tiny import write_tiny_records; "
                        f"write_tiny_records({str(root / 'grpo_data')!r}, per_task=8)"], root, "GRPO records")
    if command == "sft" and not (root / "sft_data").exists():
        _run([PY, "-c", f"from viper_jax.tiny import write_tiny_instruct_records; "
                        f"write_tiny_instruct_records({str(root / 'sft_data')!r}, count=16, two_images=False)"],
             root, "SFT records")
    if command in ("caption-refine", "visual-ops", "loop") and not (root / "photos").exists():
        _run([PY, "-c", f"from pathlib import Path; from viper_jax.loop.demo import prepare_images; "
                        f"prepare_images(Path({str(root / 'photos.partial')!r}), {NUM_PHOTOS})"], root, "photos")
        os.replace(root / "photos.partial", root / "photos")
    if command in ("caption-refine", "visual-ops") and not (root / "synth_models").exists():
        _run([PY, "-m", "synthesis_torch", "tiny-models", str(root / "synth_models.partial")], root, "tiny models")
        os.replace(root / "synth_models.partial", root / "synth_models")
    if command == "visual-ops" and not (root / "stage1").exists():
        prepare(root, "caption-refine")
        _run(command_line(root, "caption-refine", root / "stage1.partial"), root, "stage-1 records")
        os.replace(root / "stage1.partial", root / "stage1")
    if command == "convert" and not (root / "trained").exists():
        prepare(root, "train")
        _run(command_line(root, "train", root / "trained.partial"), root, "a trained checkpoint")
        os.replace(root / "trained.partial", root / "trained")


def command_line(root: Path, command: str, out: Path) -> list[str]:
    """One run of `command` writing into `out` (the same line resumes it)."""
    if command == "train":
        return [PY, "-m", "viper_jax", "train", "--config", str(ROOT / "configs/tiny.py"), "--workdir", str(out),
                *TRAIN_FLAGS]
    if command == "sft":
        return [PY, "-m", "viper_jax", "sft", "--config", str(ROOT / "configs/sft_tiny.py"), "--workdir", str(out),
                *SFT_FLAGS]
    synth = ["--out", str(out), "--config", str(ROOT / "configs/synth_tiny_cpu.py"), *SYNTH_FLAGS]
    if command == "caption-refine":
        return [PY, "-m", "synthesis_torch", "caption-refine", "--images", str(root / "photos"), *synth]
    if command == "visual-ops":
        return [PY, "-m", "synthesis_torch", "visual-ops", "--records", str(root / "stage1"), *synth]
    if command == "convert":  # small shards: the export is several files, so kills land between them
        return [PY, "-m", "viper_jax", "convert", "orbax-to-hf", "--ckpt", str(root / "trained/checkpoints"),
                "--out", str(out), "--tokenizer_dir", str(root / "trained/tiny_model"), "--max_shard_gb=0.0002"]
    if command == "loop":
        from viper_jax import loop

        overrides = tuple(loop.load_config(ROOT / "configs/loop_tiny.py").train.overrides) + LOOP_TRAIN
        return [PY, "-m", "viper_jax", "loop", "--config", str(ROOT / "configs/loop_tiny.py"), "--workdir", str(out),
                "--images", str(root / "photos"), "--quiet", f"--config.train.overrides={overrides!r}"]
    raise ValueError(f"unknown command {command!r}")


# ------------------------------------------------------------------------------------------------ digests

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _norm(value: Any, out: Path) -> Any:
    """`value` with the run's folder written as <out> and timing keys left out (JSON-like values)."""
    if isinstance(value, dict):
        return {k: _norm(v, out) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [_norm(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "<out>")
    return value


def _json_file(path: Path, out: Path) -> Any:
    return _norm(json.loads(path.read_text()), out)


def files_digest(folder: Path, out: Path) -> dict[str, Any]:
    """Every file under `folder`: JSON files parsed (paths and timings normalised), others by their bytes."""
    digest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        digest[rel] = _json_file(path, out) if path.suffix == ".json" else _sha(path.read_bytes())
    return digest


def synth_digest(folder: Path, out: Path) -> dict[str, Any]:
    """Job folders of a synthesis output: file names, each shard's records, sidecars and manifests."""
    from viper_common import records

    digest: dict[str, Any] = {}
    for job in sorted(p for p in folder.iterdir() if p.is_dir() and "-of-" in p.name):
        files: dict[str, Any] = {}
        for path in sorted(job.iterdir()):
            if path.suffix == records.SHARD_SUFFIX:
                recs = [records.decode(raw) for raw in records.read_shard(path)]
                files[path.name] = [{"id": r.id, "header": _norm(json.loads(json.dumps(dataclasses.asdict(r),
                                                                                        default=_sha)), out)}
                                    for r in recs]
            elif path.suffix == ".json":
                files[path.name] = _json_file(path, out)
            else:
                files[path.name] = _sha(path.read_bytes())
        digest[job.name] = files
    return digest


def metrics_rows(workdir: Path, out: Path) -> list[dict[str, Any]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [_norm(json.loads(line), out) for line in lines if line.strip()]


def checkpoint_digest(directory: Path) -> dict[str, Any]:
    """The final step's arrays (bytes of every leaf) and JSON items, and the folder's listing."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    listing = sorted(p.name for p in directory.iterdir())
    steps = sorted(int(n) for n in listing if n.isdigit())
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    args = {"params": ocp.args.StandardRestore(), "opt_state": ocp.args.StandardRestore(),
            "train_meta": ocp.args.JsonRestore(), "data_state": ocp.args.JsonRestore()}
    with ocp.CheckpointManager(directory, options=options) as mngr:
        items = mngr.restore(steps[-1], args=ocp.args.Composite(**args))
    arrays = {k: [f"{x.dtype}{x.shape}:{_sha(np.ascontiguousarray(x).tobytes())}"
                  for x in jax.tree.leaves(jax.tree.map(np.asarray, items[k]))] for k in ("params", "opt_state")}
    return {"listing": listing, **arrays, "train_meta": items["train_meta"], "data_state": items["data_state"]}


def trainer_digest(workdir: Path, out: Path) -> dict[str, Any]:
    rows = metrics_rows(workdir, out)
    return {"checkpoint": checkpoint_digest(workdir / "checkpoints"), "metrics": rows,
            "metric_steps": [r["step"] for r in rows]}


def digest(command: str, out: Path) -> dict[str, Any]:
    """What a finished run of `command` into `out` must hold identically however often it was killed."""
    if command in ("train", "sft"):
        return trainer_digest(out, out)
    if command in ("caption-refine", "visual-ops"):
        return synth_digest(out, out)
    if command == "convert":
        return files_digest(out, out)
    if command == "loop":
        rd = out / "round_000"
        status = json.loads((rd / "status.json").read_text())
        leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name or
                           p.name.endswith(".partial"))
        return {"status": {"state": status["state"], "steps": {k: v["state"] for k, v in status["steps"].items()}},
                "leftovers": leftovers, "synth": synth_digest(rd / "synth", out),
                "train": trainer_digest(rd / "train", out), "export": files_digest(rd / "export", out)}
    raise ValueError(f"unknown command {command!r}")


def differences(a: Any, b: Any, path: str = "", limit: int = 5) -> list[str]:
    """Where two digests differ (the first `limit` places), for the sweep's report."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in the {'reference' if k in a else 'resumed run'}")
            else:
                out += differences(a[k], b[k], f"{path}/{k}", limit)
            if len(out) >= limit:
                break
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]", limit)
            if len(out) >= limit:
                break
    elif a != b:
        out.append(f"{path}: reference {str(a)[:120]!r}, resumed {str(b)[:120]!r}")
    return out[:limit]


COMMANDS = ("train", "sft", "caption-refine", "visual-ops", "convert", "loop")
LABELS = {"train": "viper train", "sft": "viper sft", "caption-refine": "viper-synth caption-refine",
          "visual-ops": "viper-synth visual-ops", "loop": "viper loop", "convert": "viper convert orbax-to-hf"}
