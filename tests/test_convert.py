"""`viper convert`: HF -> Orbax -> HF through the command line is bit-exact (fp32 and bf16, tied and
untied, single-file and sharded), and the export loads in transformers with identical logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from hf_tiny import build_hf_model, build_inputs, hf_config, hf_logits, safetensors_in
from viper_jax import checkpoint
from viper_jax.cli import main as viper
from viper_jax.convert import load_model

INPUTS = build_inputs([[2, ("image", (1, 4, 8)), 3]], seed=4)


@pytest.mark.parametrize("tie,dtype,shard_gb", [(False, "float32", 5.0), (True, "float32", 5.0),
                                                (False, "bfloat16", 0.0002)])
def test_cli_round_trip_is_bit_exact(tmp_path, tie, dtype, shard_gb):
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    src = tmp_path / "hf"
    hf = build_hf_model(hf_config(tie=tie), seed=5).to(torch_dtype)
    hf.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")

    viper(["convert", "hf-to-orbax", "--hf_dir", str(src), "--out", str(tmp_path / "ckpt"), "--dtype", dtype])
    assert checkpoint.latest_step(tmp_path / "ckpt") == 0
    viper(["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
           "--tokenizer_dir", str(src), "--max_shard_gb", str(shard_gb)])
    out = tmp_path / "out"

    a, b = safetensors_in(src), safetensors_in(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch_dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    assert (out / "tokenizer_config.json").exists()
    assert (out / "model.safetensors.index.json").exists() == (shard_gb < 1)

    # Compare two from_pretrained loads (a model cast with .to(bf16) also casts its rotary buffers).
    load = lambda d: Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_logits(load(out), INPUTS), hf_logits(load(src), INPUTS))


def test_load_model_reads_either_format(tmp_path):
    src = tmp_path / "hf"
    build_hf_model(hf_config(), seed=6).save_pretrained(src)
    viper(["convert", "hf-to-orbax", "--hf_dir", str(src), "--out", str(tmp_path / "ckpt")])
    ours = {k: v for k, v in INPUTS.items() if k != "mm_token_type_ids"}
    from_hf = np.asarray(load_model(src)(**ours))
    from_orbax = np.asarray(load_model(tmp_path / "ckpt")(**ours))
    np.testing.assert_array_equal(from_hf, from_orbax)
    with pytest.raises(FileNotFoundError, match="neither an HF model directory"):
        load_model(tmp_path)


def test_missing_step_is_named(tmp_path):
    src = tmp_path / "hf"
    build_hf_model(hf_config(), seed=6).save_pretrained(src)
    viper(["convert", "hf-to-orbax", "--hf_dir", str(src), "--out", str(tmp_path / "ckpt"), "--step", "3"])
    with pytest.raises(FileNotFoundError, match=r"step 7 not in .*available: \[3\]"):
        viper(["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"),
               "--step", "7"])


def test_orbax_checkpoints_load_in_either_layer_layout(tmp_path):
    """A stacked checkpoint loads into per-layer modules (scan_layers=False) and a per-layer one (what a
    trainer with model.scan_layers=False saves) into either layout, with the same logits; it exports to
    HF bit-exact."""
    from flax import nnx
    from viper_jax.convert import load_orbax
    from viper_jax.models.qwen2_5_vl import load_hf

    src = tmp_path / "hf"
    build_hf_model(hf_config(), seed=6).save_pretrained(src)
    viper(["convert", "hf-to-orbax", "--hf_dir", str(src), "--out", str(tmp_path / "stacked")])
    per_layer = load_hf(src, scan_layers=False)
    checkpoint.save_params(tmp_path / "per_layer", nnx.to_pure_dict(nnx.state(per_layer, nnx.Param)),
                           per_layer.config.to_hf_dict())
    ours = {k: v for k, v in INPUTS.items() if k != "mm_token_type_ids"}
    want = {scan: np.asarray(load_hf(src, scan_layers=scan)(**ours)) for scan in (True, False)}
    for ckpt in ("stacked", "per_layer"):
        for scan in (True, False):
            model = load_orbax(tmp_path / ckpt, scan_layers=scan)
            assert (0 in nnx.to_pure_dict(nnx.state(model))["language_model"]["layers"]) == (not scan)
            np.testing.assert_array_equal(np.asarray(model(**ours)), want[scan])  # the same weights
    viper(["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "per_layer"), "--out", str(tmp_path / "out")])
    a, b = safetensors_in(src), safetensors_in(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
