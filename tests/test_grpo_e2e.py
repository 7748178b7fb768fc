"""The tiny config end to end through `viper train`: both stages on records written by the data module with the real ViPER
reward (MiniLM), checkpoints kept at stage ends, metrics in JSONL and TensorBoard, and the exported HF
directory (trainer export and `viper convert orbax-to-hf`) loading in transformers."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from grpo_tiny import ROOT, subprocess_env, train_command
from viper_jax.cli import main as viper
from viper_jax.tiny import write_tiny_records

REQUIRED = ["reward/mean", "reward/std", "reward/format", "reward/correctness", "format_rate",
            "response_length/mean", "update/clip_frac_low", "update/clip_frac_high", "update/clip_frac_dual",
            "update/kl", "update/entropy", "update/grad_norm", "update/lr", "time/rollout_s", "time/reward_s",
            "time/update_s", "throughput/rollout_tokens_per_s", "throughput/update_tokens_per_s",
            "update/skipped_nonfinite", "update/total_skipped_nonfinite"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`viper train` as a user runs it (a subprocess; XLA's fast-compile level, see grpo_tiny.py)."""
    root = tmp_path_factory.mktemp("e2e")
    write_tiny_records(root / "data", per_task=8)
    # Everything optional switched on: KL to the frozen reference, entropy bonus, dual clip, recomputed
    # old log-probs, gradient accumulation over micro-batches of one prompt, cosine schedule, export.
    overrides = [
        "--config.stages.caption_refine.steps=2", "--config.stages.visual_ops.steps=2",
        "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=1", "--config.rl.kl_coef=0.01",
        "--config.rl.kl_estimator=k3", "--config.rl.entropy_coef=0.01", "--config.rl.recompute_old_logprobs=true",
        "--config.rl.micro_batch_prompts=1", "--config.rl.dual_clip=3.0", "--config.optim.schedule=cosine",
        "--config.keep_freed_host_memory=true", f"--config.export.hf_dir={root / 'final_hf'}"]
    out = subprocess.run(train_command(root / "run", overrides), env=subprocess_env(root / "data", root / "jax_cache"),
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return root, out.stdout + out.stderr


def test_both_stages_checkpoints_and_metrics(run):
    root, output = run
    workdir = root / "run"
    assert "finished at step 4" in output and "stage caption_refine finished at step 2" in output
    assert "keep_freed_host_memory: glibc" in output  # the malloc options took effect (test_host_memory.py)
    from viper_jax.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(workdir / "checkpoints", keep=1, keep_steps=(2, 4))
    assert ckpt.all_steps() == [2, 4]  # latest 1 + both stage ends; steps 1 and 3 were deleted
    meta = ckpt.restore_json(2, "train_meta")
    assert (meta["stage_name"], meta["stage_step"], meta["step"]) == ("caption_refine", 2, 2)
    ckpt.close()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "caption_refine"), (2, "caption_refine"),
                                                       (3, "visual_ops"), (4, "visual_ops")]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["update/updates"] == 2 and len(r["record_ids"]) == 4
        # The update's forward (one image or two per prompt, one prompt per micro-batch) reproduces the
        # sampler's log-probs.
        assert r["rollout/logprob_diff_max"] < 1e-4
        assert all(i.startswith("csr-" if r["stage"] == "caption_refine" else "vop-") for i in r["record_ids"])
    assert rows[1]["update/lr"] > rows[-1]["update/lr"] > 0  # warmup (2 updates), then cosine decay
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["rl"]["kl_coef"] == 0.01


def test_export_loads_in_transformers(run, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from viper_jax.models.qwen2_5_vl import load_hf

    root, _ = run
    out = tmp_path / "hf"
    viper(["convert", "orbax-to-hf", "--ckpt", str(root / "run" / "checkpoints"), "--out", str(out),
           "--tokenizer_dir", str(root / "run" / "tiny_model")])
    exported, final = load_file(out / "model.safetensors"), load_file(root / "final_hf" / "model.safetensors")
    initial = load_file(root / "run" / "tiny_model" / "model.safetensors")
    assert sorted(exported) == sorted(final) == sorted(initial)
    for name in exported:  # the trainer's own export is the last checkpoint, bit for bit
        np.testing.assert_array_equal(exported[name], final[name], err_msg=name)
    assert any(not np.array_equal(exported[n], initial[n]) for n in exported)  # training moved the weights

    tok = AutoTokenizer.from_pretrained(str(out))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    ids = np.asarray([tok("a red ellipse on a gradient")["input_ids"]], np.int64)
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(load_hf(out)(ids))
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
