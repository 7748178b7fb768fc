"""HF checkpoint import/export: round trips are bit-exact and load back in transformers; bad checkpoints
fail with messages that name the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from hf_tiny import (build_hf_model, build_inputs, flat_hub_config_dict, hf_config, hf_logits,  # noqa: E402
                     safetensors_in, tiny_config_dict)
from viper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, load_hf, save_hf  # noqa: E402

INPUTS = build_inputs([[2, ("image", (1, 4, 8)), 3]], seed=4)


def _assert_bit_exact(a_dir: Path, b_dir: Path) -> None:
    a, b = safetensors_in(a_dir), safetensors_in(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """save_pretrained directories: untied fp32, untied bf16, tied fp32."""
    dirs = {}
    for key, tie, dtype in [("fp32", False, torch.float32), ("bf16", False, torch.bfloat16), ("tied", True, torch.float32)]:
        model = build_hf_model(hf_config(tie=tie), seed=7).to(dtype)
        dirs[key] = tmp_path_factory.mktemp(key)
        model.save_pretrained(dirs[key])
    return dirs


@pytest.mark.parametrize("key,dtype", [("fp32", jnp.float32), ("bf16", jnp.bfloat16), ("tied", jnp.float32)])
def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_dirs, tmp_path, key, dtype):
    src = hf_dirs[key]
    model = load_hf(src, dtype=dtype)
    out = save_hf(model, None, tmp_path / "out")
    _assert_bit_exact(src, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == ("bfloat16" if key == "bf16" else "float32")
    if key == "tied":
        assert "lm_head.weight" not in safetensors_in(out)
    torch_dtype = torch.bfloat16 if key == "bf16" else torch.float32
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, attn_implementation="eager", dtype=torch_dtype)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager", dtype=torch_dtype)
    np.testing.assert_array_equal(hf_logits(back.eval(), INPUTS), hf_logits(ref.eval(), INPUTS))


def test_bf16_checkpoint_into_fp32_params_exports_bit_exact_bf16(hf_dirs, tmp_path):
    model = load_hf(hf_dirs["bf16"], dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    _assert_bit_exact(hf_dirs["bf16"], save_hf(model, None, tmp_path / "out", dtype=jnp.bfloat16))


def test_sharded_export_and_import(hf_dirs, tmp_path):
    model = load_hf(hf_dirs["fp32"])
    out = save_hf(nnx.state(model), model.config, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {f.name for f in files}
    _assert_bit_exact(hf_dirs["fp32"], out)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dirs["fp32"], attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(back.eval(), INPUTS), hf_logits(ref.eval(), INPUTS))
    # transformers' own sharded layout reads back too.
    ref.save_pretrained(tmp_path / "hf_sharded", max_shard_size="150KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    _assert_bit_exact(hf_dirs["fp32"], save_hf(load_hf(tmp_path / "hf_sharded"), None, tmp_path / "again"))


def test_v5_in_memory_names_are_accepted(hf_dirs, tmp_path):
    model = build_hf_model(hf_config(), seed=7)
    names = list(model.state_dict())
    assert any(n.startswith("model.language_model.") for n in names) and any(n.startswith("model.visual.") for n in names)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((hf_dirs["fp32"] / "config.json").read_text())
    _assert_bit_exact(hf_dirs["fp32"], save_hf(load_hf(tmp_path), None, tmp_path / "out"))


def test_tokenizer_files_are_copied(hf_dirs, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                 "preprocessor_config.json", "video_preprocessor_config.json", "notes.txt"):
        (tok / name).write_text("{}")
    out = save_hf(load_hf(hf_dirs["tied"]), None, tmp_path / "out", tokenizer_dir=tok)
    copied = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
            "preprocessor_config.json", "video_preprocessor_config.json"} <= copied
    assert "notes.txt" not in copied


def test_config_layouts():
    nested = Qwen2_5_VLConfig.from_hf_dict(tiny_config_dict())
    assert Qwen2_5_VLConfig.from_hf_dict(flat_hub_config_dict()) == nested
    assert Qwen2_5_VLConfig.from_hf_dict(nested.to_hf_dict()) == nested
    assert nested.text.mrope_section == (2, 3, 3) and nested.vision.fullatt_block_indexes == (1, 3)
    with pytest.raises(ValueError, match="'qwen2_vl'"):
        Qwen2_5_VLConfig.from_hf_dict({**tiny_config_dict(), "model_type": "qwen2_vl"})


# ---------------------------------------------------------------------------- failures

def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = {k: v.clone() for k, v in safetensors_in(src).items()}
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_pickle_checkpoint_is_refused(hf_dirs, tmp_path):
    (tmp_path / "config.json").write_text((hf_dirs["fp32"] / "config.json").read_text())
    torch.save(safetensors_in(hf_dirs["fp32"]), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        load_hf(tmp_path)


def test_missing_tensor(hf_dirs, tmp_path):
    d = _copy_with(hf_dirs["fp32"], tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_hf(d)


def test_unexpected_tensor(hf_dirs, tmp_path):
    d = _copy_with(hf_dirs["fp32"], tmp_path / "u", lambda t: t.update({"model.layers.0.extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"unexpected .*model\.layers\.0\.extra\.weight"):
        load_hf(d)


def test_misshaped_tensor(hf_dirs, tmp_path):
    d = _copy_with(hf_dirs["fp32"], tmp_path / "s",
                   lambda t: t.update({"visual.blocks.2.attn.qkv.weight": torch.zeros(96, 30)}))
    with pytest.raises(ValueError, match=r"visual\.blocks\.2\.attn\.qkv\.weight.*\(96, 30\).*\(96, 32\)"):
        load_hf(d)


def test_wrong_model_type_is_refused(hf_dirs, tmp_path):
    d = _copy_with(hf_dirs["fp32"], tmp_path / "t", lambda t: None)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ValueError, match="'llava'"):
        load_hf(d)


def test_save_rejects_foreign_state(hf_dirs, tmp_path):
    model = load_hf(hf_dirs["tied"])
    state = nnx.to_pure_dict(nnx.state(model))
    state["lm_head"] = {"weight": jnp.zeros((1000, 64))}  # the config says tied
    with pytest.raises(ValueError, match="lm_head"):
        save_hf(state, model.config, tmp_path / "out")


# ---------------------------------------------------------------------------- sharded placement

SHARDED_LOAD = textwrap.dedent("""
    import sys, numpy as np, jax
    from flax import nnx
    from viper_jax.models.qwen2_5_vl import load_hf
    from jax.sharding import NamedSharding, PartitionSpec as P
    from viper_jax.sharding import logical_to_spec, make_mesh, tree_shardings
    mesh = make_mesh((1, 2, 1))
    ref = load_hf(sys.argv[1])
    abstract = nnx.state(ref)
    shardings = tree_shardings(nnx.get_partition_spec(abstract), abstract, mesh)
    model = load_hf(sys.argv[1], shardings=shardings)
    q = model.language_model.layers.self_attn.q_proj.kernel[...]
    assert len(q.addressable_shards) == 2 and q.addressable_shards[0].data.shape == (2, 32, 64), q.sharding
    assert q.sharding.spec[1] == "fsdp", q.sharding.spec
    for a, b in zip(jax.tree.leaves(nnx.state(ref)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A callable gets (path, shape, logical names) per parameter.
    seen = []
    def by_rule(path, shape, names):
        seen.append(path)
        return NamedSharding(mesh, logical_to_spec(names))
    again = load_hf(sys.argv[1], shardings=by_rule)
    emb = again.language_model.embed_tokens.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp") and len(seen) == len(jax.tree.leaves(nnx.state(ref)))
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(ref.language_model.embed_tokens.embedding[...]))
    print("ok")
""")


def test_load_onto_a_mesh_reads_per_device_slices(hf_dirs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(hf_dirs["fp32"])], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_per_layer_modules_round_trip_bit_exact(hf_dirs, tmp_path):
    """scan_layers=False holds layers.<i> / blocks.<i> subtrees; they export like the stacked layout, and a
    missing layer is named."""
    model = load_hf(hf_dirs["fp32"], scan_layers=False)
    _assert_bit_exact(hf_dirs["fp32"], save_hf(model, None, tmp_path / "out"))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del pure["language_model"]["layers"][1]["mlp"]["up_proj"]
    with pytest.raises(ValueError, match=r"missing parameter language_model\.layers\.1\.mlp\.up_proj\.kernel "
                                         r"\(HF model\.layers\.1\.mlp\.up_proj\.weight\)"):
        save_hf(pure, model.config, tmp_path / "bad")
