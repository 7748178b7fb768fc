"""`viper world base`: data, tokenizer, random-init model and `viper sft`, end to end at toy scale; resuming a
finished build redoes nothing; the export loads in viper_jax and answers in the world's format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--config.world.n_train=24", "--config.world.tokenizer_scenes=50", "--config.world.vocab_size=400",
       "--config.world.workers=1", "--config.model.hidden=64", "--config.model.layers=1",
       "--config.model.intermediate=128", "--config.model.vision_hidden=32", "--config.model.vision_depth=1",
       "--config.model.vision_heads=2", "--config.sft.steps=3", "--config.sft.data.batch_size=4",
       "--config.sft.sft.images_per_batch=8", "--config.sft.sft.focus_steps=1",
       "--config.sft.checkpoint.every_steps=2", "--config.vision.steps=4", "--config.vision.batch_size=4",
       "--config.vision.pool_scenes=16"]


def _run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "viper_jax", "world", "base", "--workdir", str(workdir),
           "--config", str(ROOT / "configs" / "world_base.py"), *TOY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_world_base_builds_resumes_and_exports(tmp_path):
    work = tmp_path / "base"
    # What a run killed while saving the tokenizer or the init model leaves: half-written .tmp folders.
    for half in (work / "data" / "tokenizer.tmp", work / "init_model.tmp"):
        half.mkdir(parents=True)
        (half / "config.json").write_text("{")
    out = _run(work)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((work / "base.json").read_text())
    assert summary["sft"]["steps"] == 3 and summary["sft"]["tokens_per_s"] > 0
    assert set(summary["seconds"]) == {"data", "tokenizer", "init_model", "sft"}
    assert summary["vision_pretrain"]["steps"] == 4  # the tower was pretrained before the SFT
    assert not (work / "init_model.tmp").exists() and not (work / "data" / "tokenizer.tmp").exists()
    manifest = json.loads((work / "data" / "base_data" / "manifest.json").read_text())
    assert manifest["num_records"] == sum(manifest["shards"].values()) == 24
    # The export is the world tokenizer's model: its vocabulary is the trained BPE's, not the byte tokenizer's.
    from transformers import AutoTokenizer

    from viper_jax.models.qwen2_5_vl import load_hf

    tok = AutoTokenizer.from_pretrained(str(work / "base_hf"))
    model = load_hf(work / "base_hf")
    assert model.config.text.vocab_size == len(tok) <= 400
    assert model.config.vision.depth == 1 and model.config.text.hidden_size == 64
    # transformers' AutoProcessor (what viper-synth loads) resizes to the world's 112 px: 16 visual tokens.
    import io

    from PIL import Image
    from transformers import AutoProcessor

    from viper_common.shapeworld import render, scene

    processor = AutoProcessor.from_pretrained(str(work / "base_hf"))
    png = render.render_png(scene.sample_scene(np.random.default_rng(0)), 0, 112)
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.open(io.BytesIO(png))],
                    return_tensors="np")
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert (enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == 16

    # A finished build is reused: no step reruns (SFT finds its last checkpoint at the final step).
    mtime = (work / "init_model" / "config.json").stat().st_mtime
    again = _run(work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "init_model" / "config.json").stat().st_mtime == mtime
    rows = [json.loads(line) for line in (work / "sft" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["focus_only"] for r in rows if "loss" in r] == [1, 0, 0]  # the focus curriculum's first phase


def test_world_base_refuses_unknown_keys_and_bad_architecture(tmp_path):
    out = _run(tmp_path / "x", "--config.model.hiddn=64")
    assert out.returncode != 0 and "model.hiddn" in out.stderr and "Traceback" not in out.stderr
    out = _run(tmp_path / "y", "--config.model.heads=3")
    assert out.returncode != 0 and "config model" in out.stderr and "Traceback" not in out.stderr
    out = _run(tmp_path / "z", "--config.sft.sft.focus_steps=9")  # past sft.steps=3: refused before any data
    assert out.returncode != 0 and "sft.sft.focus_steps" in out.stderr and not (tmp_path / "z" / "data").exists()
    out = _run(tmp_path / "r", "--config.model.rope_theta=1")
    assert out.returncode != 0 and "model.rope_theta" in out.stderr and not (tmp_path / "r" / "data").exists()


def test_the_rope_theta_setting_reaches_the_model_config():
    from transformers import AutoTokenizer

    from viper_jax.world.base import base_config, model_config

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "assets" / "world_base")
    m = base_config().model
    assert model_config(tokenizer, m).text.rope_theta == 1e6  # Qwen2.5-VL's
    m.rope_theta = 10.0
    assert model_config(tokenizer, m).text.rope_theta == 10.0
