"""`viper sft`: the answer-token loss against transformers' cross-entropy, learning, exact resume after
SIGKILL, ViPER and instruct records, the HF export, and the errors a user sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from grpo_tiny import (ROOT, assert_bitwise_equal, committed, compilation_cache, kill_after_checkpoint,
                       raw_checkpoint, subprocess_env)
from viper_common import records as R
from viper_jax.tiny import write_tiny_instruct_records, write_tiny_model, write_tiny_records

CONFIG = ROOT / "configs" / "sft_tiny.py"
QUIET = ("--config.logging.progress_bar=false", "--config.logging.tensorboard=false")


def sft_config(workdir: Path, data_glob: str, overrides=()):
    from viper_jax.sft.config import apply_overrides, load_config

    config = load_config(CONFIG)
    apply_overrides(config, [*QUIET, f"--config.data.shard_globs={data_glob}", *overrides])
    config.workdir = str(workdir)
    return config


def first_batch(config, tokenizer) -> dict:
    """The first batch of viper sft's pipeline for `config`."""
    from viper_jax.sft.trainer import make_sft_pipeline

    pipeline = make_sft_pipeline(config, tokenizer)
    try:
        return next(pipeline)
    finally:
        pipeline.close()


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    with compilation_cache(tmp_path_factory.mktemp("jax_cache")):
        yield


# ------------------------------------------------------------------------------ (a) the loss, by reference

def test_loss_equals_transformers_cross_entropy_on_answer_tokens(tmp_path):
    """One batch of every record kind (1- and 2-image rows, left-padded to a bucket): our loss equals
    the token mean of transformers' fp32 cross-entropy over the assistant answer + <|im_end|>, each row
    run alone (no padding) from Qwen2_5_VLProcessor's own tokens of the chat with the answer in it."""
    import torch
    from transformers import (AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor)
    from PIL import Image
    import io

    from viper_jax.models.qwen2_5_vl import load_hf
    from viper_jax.sft.step import answer_loss, model_inputs

    model_dir = write_tiny_model(tmp_path / "model", seed=3)
    write_tiny_records(tmp_path / "data", per_task=2)
    write_tiny_instruct_records(tmp_path / "data", count=4)  # records 2, 3 have two images
    config = sft_config(tmp_path / "run", f"{tmp_path}/data/*/part-*.arrayrecord",
                        ["--config.data.batch_size=8", "--config.data.shuffle=false"])
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    batch = first_batch(config, tok)
    assert sorted(batch["task"]) == ["caption_refine"] * 2 + ["instruct"] * 4 + ["visual_ops"] * 2

    model = load_hf(model_dir)
    loss, aux = jax.jit(lambda inputs: answer_loss(model, inputs))(model_inputs(batch, model.config))
    # Blank images padding the batch to a fixed image count (one program per bucket) change nothing.
    padded = model_inputs(batch, model.config, images_per_batch=16)
    assert padded["pixel_values"].shape[0] == 16 * int(np.asarray(batch["image_grid_thw"])[-1].prod())
    loss_padded, _ = jax.jit(lambda inputs: answer_loss(model, inputs))(padded)
    np.testing.assert_allclose(float(loss_padded), float(loss), rtol=1e-6)
    with pytest.raises(ValueError, match="sft.images_per_batch"):
        model_inputs(batch, model.config, images_per_batch=2)

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=config.data.min_pixels,
                                                                         max_pixels=config.data.max_pixels),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    by_id = {r.id: r for p in sorted((tmp_path / "data").glob("*/part-*")) for r in map(R.decode, R.read_shard(p))}
    total_nll, total_tokens = 0.0, 0
    for row, rid in enumerate(batch["id"]):
        rec = by_id[rid]
        if rec.task == "instruct":
            prompt, answer = rec.prompt, rec.answer
        else:
            prompt = config.data.prompts[rec.task].replace("{caption}", rec.caption or "")
            answer = "<think></think><answer>" + "\n".join(rec.truth) + "</answer>"  # sft.think "", joiner "\n"
        user = [{"type": "image"} for _ in rec.images] + [{"type": "text", "text": prompt}]
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full_text = proc.apply_chat_template(chat, tokenize=False)
        assert full_text.endswith(answer + "<|im_end|>\n")
        images = [Image.open(io.BytesIO(b)) for b in rec.images]
        full = proc(text=[full_text[:-1]], images=images, return_tensors="pt")  # up to and including <|im_end|>
        head = proc(text=[proc.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)],
                    images=images, return_tensors="np")["input_ids"][0]
        ids = full["input_ids"][0].numpy()
        np.testing.assert_array_equal(ids[:len(head)], head)  # the prompt is the generation prompt
        # Our row, without its left padding, is the processor's sequence; the mask is its answer part.
        mask = batch["attention_mask"][row].astype(bool)
        np.testing.assert_array_equal(batch["input_ids"][row][mask], ids)
        np.testing.assert_array_equal(batch["loss_mask"][row][mask], np.arange(len(ids)) >= len(head))
        with torch.no_grad():
            logits = hf(**full).logits[0].float()
        targets = torch.from_numpy(ids[len(head):]).long()
        total_nll += float(torch.nn.functional.cross_entropy(logits[len(head) - 1:-1], targets, reduction="sum"))
        total_tokens += len(targets)
    assert float(aux["answer_tokens"]) == total_tokens
    reference = total_nll / total_tokens  # mean over the batch's answer tokens
    # fp32 on both sides; different kernels and summation orders: a few ulps of the per-token values.
    np.testing.assert_allclose(float(loss), reference, rtol=2e-6)


# ------------------------------------------------------------------------------ (b) learning, export

def test_loss_falls_and_the_export_loads_everywhere(tmp_path, jax_cache):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from viper_jax.convert import load_orbax
    from viper_jax.models.qwen2_5_vl import load_hf
    from viper_jax.sft.trainer import train

    write_tiny_instruct_records(tmp_path / "data", count=16, two_images=False)  # one batch shape: one compile
    hf_dir = tmp_path / "hf"
    config = sft_config(tmp_path / "run", f"{tmp_path}/data/*/part-*.arrayrecord",
                        ["--config.steps=30", "--config.checkpoint.every_steps=30", f"--config.export.hf_dir={hf_dir}"])
    result = train(config)
    rows = metrics(tmp_path / "run")
    assert result["step"] == 30 and [r["step"] for r in rows] == list(range(1, 31))
    losses = np.asarray([r["loss"] for r in rows])
    assert np.isfinite(losses).all()
    # ln(300 tokens) ~ 5.6 at random init; ~0.9 after 30 steps here (the answers are nearly memorised).
    assert losses[-5:].mean() < 0.25 * losses[0], losses
    for r in rows:
        assert 0 < r["answer_tokens"] < r["tokens"] <= r["padded_tokens"]
        assert r["tokens_per_s"] > r["answer_tokens_per_s"] > 0 and r["seconds"] > 0
        assert r["skipped_nonfinite"] == 0 and r["data/skipped"] == 0 and np.isfinite(r["grad_norm"])
    assert rows[0]["lr"] == 0.0 and rows[3]["lr"] == pytest.approx(1e-2)  # warmup 3, then the peak

    # The export is the trained model: transformers and viper_jax load it and agree with the checkpoint.
    trained = load_orbax(tmp_path / "run" / "checkpoints")
    ids = np.asarray([[5, 70, 71, 72, 73, 74, 75]], np.int32)
    want = np.asarray(trained(ids))
    np.testing.assert_array_equal(np.asarray(load_hf(hf_dir)(ids)), want)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)  # fp32, another implementation
    assert (hf_dir / "tokenizer.json").exists()


# ------------------------------------------------------------------------------ (c) SIGKILL, resume

FINAL, EVERY = 40, 4  # 16 records / batch 4: the run crosses 9 epoch boundaries (a new shuffle each)


def test_sigkill_then_rerun_is_bitwise_an_uninterrupted_run(tmp_path):
    write_tiny_instruct_records(tmp_path / "data", count=16, two_images=False)
    env = dict(subprocess_env(tmp_path / "data", tmp_path / "jax_cache"), VIPER_SFT_DATA=str(tmp_path / "data"))
    command = lambda workdir: [sys.executable, "-m", "viper_jax", "sft", "--config", str(CONFIG), "--workdir",
                               str(workdir), *QUIET, f"--config.steps={FINAL}",
                               f"--config.checkpoint.every_steps={EVERY}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(command(full), env=env, check=True, cwd=ROOT, capture_output=True, timeout=600)

    kill_after_checkpoint(command(killed), env, killed, EVERY)
    assert not committed(killed, FINAL)
    before = {r["step"]: r["record_ids"] for r in metrics(killed)}
    assert max(before) >= EVERY

    out = subprocess.run(command(killed), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr

    a, b = (raw_checkpoint(w, FINAL, ("train_meta", "data_state")) for w in (full, killed))
    assert a["train_meta"] == b["train_meta"] and a["train_meta"]["updates"] == FINAL
    assert a["data_state"] == b["data_state"]
    assert_bitwise_equal(a, b)

    full_rows, resumed_rows = metrics(full), metrics(killed)
    assert [r["step"] for r in resumed_rows] == list(range(1, FINAL + 1))  # each step exactly once
    for ra, rb in zip(full_rows, resumed_rows):
        assert ra["record_ids"] == rb["record_ids"] and ra["loss"] == rb["loss"], ra["step"]
    for step, ids in before.items():
        assert ids == full_rows[step - 1]["record_ids"]
    epochs = [sorted(i for r in full_rows[e * 4:(e + 1) * 4] for i in r["record_ids"]) for e in range(FINAL // 4)]
    assert all(e == sorted(f"ins-{i:04d}" for i in range(16)) for e in epochs)  # every record once per epoch
    assert len({tuple(i for r in full_rows[e * 4:(e + 1) * 4] for i in r["record_ids"]) for e in range(3)}) == 3


def test_two_device_mesh_trains_as_one_device(tmp_path):
    """The batch split over fsdp=2 (parameters and optimizer state sharded by the trainer's rules): the
    same losses as on one device, to fp32 reduction-order noise."""
    write_tiny_instruct_records(tmp_path / "data", count=8, two_images=False)
    env = dict(subprocess_env(tmp_path / "data", tmp_path / "jax_cache"), VIPER_SFT_DATA=str(tmp_path / "data"))
    runs = {}
    for devices in (1, 2):
        workdir = tmp_path / f"run{devices}"
        flags = env["XLA_FLAGS"] + f" --xla_force_host_platform_device_count={devices}"
        out = subprocess.run([sys.executable, "-m", "viper_jax", "sft", "--config", str(CONFIG), "--workdir",
                              str(workdir), *QUIET, "--config.steps=4", f"--config.mesh.fsdp={devices}"],
                             env=dict(env, XLA_FLAGS=flags), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[devices] = metrics(workdir)
    assert [r["record_ids"] for r in runs[1]] == [r["record_ids"] for r in runs[2]]
    np.testing.assert_allclose([r["loss"] for r in runs[2]], [r["loss"] for r in runs[1]], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in runs[2]], [r["grad_norm"] for r in runs[1]], rtol=1e-4)


# ------------------------------------------------------------------------------ (d) both kinds of record

def test_viper_and_instruct_records_train_together(tmp_path, jax_cache):
    from transformers import AutoTokenizer

    from viper_jax.sft.trainer import train

    write_tiny_records(tmp_path / "data", per_task=4)
    write_tiny_instruct_records(tmp_path / "data", count=4)
    config = sft_config(tmp_path / "run", f"{tmp_path}/data/*/part-*.arrayrecord",
                        ["--config.steps=2", "--config.data.batch_size=6", "--config.sft.images_per_batch=12",
                         "--config.sft.think=Look closely."])
    # What each kind learns: the decoded answer-token span of every row.
    tokenizer = AutoTokenizer.from_pretrained(str(_tiny_dir(tmp_path)))
    by_id = {r.id: r for p in sorted((tmp_path / "data").glob("*/part-*")) for r in map(R.decode, R.read_shard(p))}
    batch = first_batch(config, tokenizer)
    for row, rid in enumerate(batch["id"]):
        rec = by_id[rid]
        got = tokenizer.decode(batch["input_ids"][row][batch["loss_mask"][row] == 1])
        if rec.task == "instruct":
            assert got == rec.answer + "<|im_end|>"
        else:
            assert got == "<think>Look closely.</think><answer>" + "\n".join(rec.truth) + "</answer><|im_end|>"
    assert batch["loss_mask"].sum() == batch["answer_lengths"].sum()
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()  # never on padding

    result = train(config)
    rows = metrics(tmp_path / "run")
    tasks = {i.split("-")[0] for r in rows for i in r["record_ids"]}
    assert result["step"] == 2 and tasks == {"csr", "vop", "ins"}
    assert all(np.isfinite(r["loss"]) and r["skipped_nonfinite"] == 0 and r["data/skipped"] == 0 for r in rows)
    assert rows[1]["data/seen"] == 12


def _tiny_dir(tmp_path: Path) -> Path:
    """The tiny model (and its tokenizer) `model.tiny_init` writes, written once per test."""
    path = tmp_path / "run" / "tiny_model"
    if not (path / "config.json").exists():
        write_tiny_model(path)
    return path


def test_too_long_and_bad_answers_are_counted_skips(tmp_path):
    from transformers import AutoTokenizer

    from viper_jax.sft.trainer import make_sft_pipeline

    long = "<think></think><answer>" + "a" * 400 + "</answer>"  # byte tokens: past the 384 bucket
    base = dict(task=R.INSTRUCT, images=[_png()], truth=[], prompt="Colour?")
    recs = [R.ViperRecord(id="ok", answer="<answer>red</answer>", **base),
            R.ViperRecord(id="long", answer=long, **base),
            R.ViperRecord(id="pads", answer="<|image_pad|> red", **base)]
    R.write_shard(tmp_path / "data" / "part-00000.arrayrecord", recs)
    config = sft_config(tmp_path / "run", f"{tmp_path}/data/part-*.arrayrecord",
                        ["--config.data.batch_size=1", "--config.data.shuffle=false", "--config.data.num_epochs=1",
                         "--config.data.min_seen_for_skip_check=1000"])
    pipeline = make_sft_pipeline(config, AutoTokenizer.from_pretrained(str(_tiny_dir(tmp_path))))
    assert [b["id"][0] for b in pipeline] == ["ok"]
    assert pipeline.stats.as_dict() == {"seen": 3, "skipped": {"bad_answer": 1, "too_long": 1}}


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ (e) user errors

def test_cli_errors_are_one_line(tmp_path, capsys):
    from viper_jax.sft.trainer import run_cli

    cases = [(["--config.optim.learnig_rate=1"], "unknown config key 'optim.learnig_rate'; did you mean learning_rate"),
             ([f"--config.data.shard_globs={tmp_path}/none/*.arrayrecord"],
              f"config data.shard_globs: shard glob '{tmp_path}/none/*.arrayrecord' matches no file"),
             (["--config.steps=0"], "config steps: must be positive"),
             (["--config.sft.images_per_batch=-1"], "config sft.images_per_batch: must be >= 0")]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as info:
            run_cli(str(CONFIG), str(tmp_path / "run"), [*QUIET, *overrides])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "tiny_model").exists()  # refused before any model work


def test_write_random_model_from_a_config_dict(tmp_path):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from viper_jax.models.qwen2_5_vl import load_hf
    from viper_jax.tiny import tiny_model_config, write_random_model

    tok_dir = _tiny_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = tiny_model_config(tok, hidden=96, layers=3).to_hf_dict()
    out = write_random_model(tmp_path / "m", cfg, tok_dir, seed=1)
    ours = load_hf(out)
    assert ours.config.text.num_hidden_layers == 3 and ours.config.text.hidden_size == 96
    ids = np.asarray([[5, 6, 7, 8]], np.int32)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(ours(ids)), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="vocab_size 100 < the tokenizer's"):
        write_random_model(tmp_path / "bad", dict(cfg, text_config=dict(cfg["text_config"], vocab_size=100)), tok)
    with pytest.raises(ValueError, match="image_token_id is 3"):
        write_random_model(tmp_path / "bad", dict(cfg, image_token_id=3), tok)
