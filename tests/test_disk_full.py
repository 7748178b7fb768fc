"""A full disk (ENOSPC) part way through a synthesis shard, a trainer checkpoint and an HF export: one line
naming what could not be written, nothing half-written under a final name, and a rerun that finishes the job.

The disk fills by monkeypatching the write in question to write part of its bytes and then raise
OSError(errno.ENOSPC), as the kernel does once the filesystem is full."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from viper_common.cli_errors import run_console

REPO = Path(__file__).resolve().parents[1]


def _full(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _one_line_error(capsys: pytest.CaptureFixture, prog: str, *names: str) -> str:
    """The CLI's error: one line `prog: ...` (progress bars aside), no traceback, naming `names`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1, err
    assert "No space left on device" in lines[0]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- synthesis shard

def test_disk_full_in_a_synthesis_shard(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from synthesis_torch.cli import main
    from synthesis_torch.tiny_models import write_tiny_models
    from viper_common import records
    from viper_jax.loop.demo import prepare_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: see conftest.one_torch_thread
    try:
        write_tiny_models(tmp_path / "models")
        prepare_images(tmp_path / "images", 4)
        monkeypatch.setenv("VIPER_TINY_DIR", str(tmp_path / "models"))
        out = tmp_path / "out"
        argv = ["caption-refine", "--images", str(tmp_path / "images"), "--out", str(out),
                "--config", str(REPO / "configs/synth_tiny_cpu.py"), "--config.chunk_size=2"]
        real_write, calls = records.ShardWriter.write, {"n": 0}

        def fills_up(self, record):  # the first record of the second part goes in, the second does not
            calls["n"] += 1
            if calls["n"] == 4:  # 4 photos, 2 a part
                raise _full(self._tmp)
            real_write(self, record)

        monkeypatch.setattr(records.ShardWriter, "write", fills_up)
        assert run_console("viper-synth", main, argv) == 1
        job = out / "caption_refine-00000-of-00001"
        _one_line_error(capsys, "viper-synth", str(job / "part-00001.arrayrecord"))
        assert sorted(p.name for p in job.iterdir()) == ["manifest.json", "part-00000.arrayrecord", "part-00000.json"]
        assert not records.read_manifest(job)["complete"]

        monkeypatch.setattr(records.ShardWriter, "write", real_write)
        assert run_console("viper-synth", main, argv) == 0
        manifest = records.read_manifest(job)
        assert manifest["complete"] and manifest["num_processed"] == 4
        keys = [k for p in sorted(job.glob("part-*.json")) for k in json.loads(p.read_text())["keys"]]
        assert len(keys) == len(set(keys)) == 4  # each input exactly once
        for name, count in manifest["shards"].items():
            assert len(list(records.read_shard(job / name))) == count
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- checkpoint

@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_in_a_checkpoint_save(tmp_path, monkeypatch, async_save):
    import jax.numpy as jnp
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    from viper_common.cli_errors import one_line
    from viper_jax.checkpoint import CheckpointWriteError, TrainCheckpointer

    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}

    def save(ckpt: TrainCheckpointer, step: int) -> None:
        ckpt.save(step, params=tree, opt_state={"mu": tree}, model_config={"model_type": "test"},
                  meta={"step": step}, data_state={"position": step})

    ckpt = TrainCheckpointer(tmp_path / "checkpoints", keep=3, async_save=async_save)
    save(ckpt, 1)
    ckpt.wait()

    async def fills_up(self, x, directory):  # Orbax's JSON item writer: half the text, then a full disk
        path = directory / self._filename
        path.write_text(json.dumps(x)[:5])
        raise _full(path)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", fills_up)
    with pytest.raises(CheckpointWriteError) as caught:
        save(ckpt, 2)
        ckpt.wait()  # an asynchronous save reports here
    message = one_line(caught.value)
    assert "\n" not in str(caught.value) and "resumes from step 1" in message
    assert f"checkpoint step 2 in {tmp_path / 'checkpoints'} could not be written" in message
    # Orbax raises the writers' ENOSPC or, when its clean-up of the step's folder races them, the clean-up's
    # error (the ENOSPC then only logged): the message then gives the free space instead.
    assert ("No space left on device" in message and caught.value.errno == errno.ENOSPC) or "MiB free there" in message
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.endswith("tmp")
                  and ".orbax-checkpoint-tmp" not in p.name) == ["1"]  # step 2 never visible

    # The rerun is a new process, as after a real full disk: this one's TensorStore writers of the failed
    # step may still be finishing in the background.
    rerun = subprocess.run([sys.executable, "-c", _RERUN, str(tmp_path / "checkpoints"), str(int(async_save))],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.splitlines()[-1]) == {"latest_before": 1, "steps": [1, 2], "data_state": {"position": 2}}


_RERUN = """
import json, sys
import jax.numpy as jnp
from viper_jax.checkpoint import TrainCheckpointer
tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
ckpt = TrainCheckpointer(sys.argv[1], keep=3, async_save=bool(int(sys.argv[2])))
before = ckpt.latest_step()
ckpt.save(2, params=tree, opt_state={"mu": tree}, model_config={"model_type": "test"}, meta={"step": 2},
          data_state={"position": 2})
ckpt.close()
again = TrainCheckpointer(sys.argv[1], keep=3, async_save=False)
print(json.dumps({"latest_before": before, "steps": again.all_steps(), "data_state": again.restore_json(2, "data_state")}))
"""


# ------------------------------------------------------------------------------------------- HF export

class _FillingFile(io.FileIO):
    """A file whose disk fills after `room` bytes: the write that crosses it writes what fits, then raises."""
    room = 0

    def write(self, data) -> int:  # type: ignore[override]
        data = bytes(data)
        if len(data) > type(self).room:
            super().write(data[:type(self).room])
            type(self).room = 0
            raise _full(self.name)
        type(self).room -= len(data)
        return super().write(data)


def test_disk_full_in_an_hf_export(tmp_path, monkeypatch, capsys):
    from viper_jax import checkpoint, cli
    from viper_jax.models.qwen2_5_vl import load_hf, weights
    from viper_jax.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", seed=1)
    from flax import nnx

    model = load_hf(model_dir)
    checkpoint.save_params(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                           model.config.to_hf_dict())
    out = tmp_path / "export"
    argv = ["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
            "--tokenizer_dir", str(model_dir)]
    _FillingFile.room = 20_000  # inside the first tensors of model.safetensors

    def opens(path, mode="r", *args, **kwargs):
        assert mode == "wb", mode
        return _FillingFile(path, "wb")

    monkeypatch.setattr(weights, "open", opens, raising=False)  # the safetensors writer's open
    assert run_console("viper", cli.main, argv) == 1
    _one_line_error(capsys, "viper", str(out / "model.safetensors"))
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # no half file, no config.json

    monkeypatch.undo()
    assert run_console("viper", cli.main, argv) == 0
    exported = load_hf(out)
    a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(exported, nnx.Param))
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------- small files

def test_disk_full_in_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    """Manifests, sidecars, the loop's status, metrics rewrites: the old content stays, no temporary is left."""
    from viper_common import atomic_files

    target = tmp_path / "manifest.json"
    atomic_files.write_json_atomic(target, {"version": 1})
    real = Path.write_bytes

    def fills_up(self: Path, data: bytes) -> int:
        real(self, data[: len(data) // 2])
        raise _full(self)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    with pytest.raises(OSError) as caught:
        atomic_files.write_json_atomic(target, {"version": 2, "padding": "x" * 100})
    assert caught.value.errno == errno.ENOSPC and str(target) in str(caught.value) and ".tmp" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert json.loads(target.read_text()) == {"version": 1}
    monkeypatch.undo()
    atomic_files.write_json_atomic(target, {"version": 2})  # the rerun
    assert json.loads(target.read_text()) == {"version": 2}
