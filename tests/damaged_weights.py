"""Damaged model files for tests/test_damaged_inputs.py: safetensors files and their index, the model's
config.json (read by `viper convert hf-to-orbax`), and Orbax checkpoint steps (read by `viper convert
orbax-to-hf`), each through the `viper` console entry point in-process."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

from damaged_inputs_cases import (Outcome, Shared, case, console, convert_hf, convert_orbax, copy_model,
                                  safetensors_parts, write_safetensors)


# ------------------------------------------------------------------------------------------ safetensors

def _damaged_weights(shared: Shared, tmp: Path, damage: Callable[[Path], None]) -> tuple[Outcome, list[str]]:
    model = copy_model(shared, tmp)
    damage(model / "model.safetensors")
    return convert_hf(model, tmp), [str(model / "model.safetensors")]


@case("safetensors", "data cut to half its length")
def _(shared: Shared, tmp: Path):
    def cut(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return _damaged_weights(shared, tmp, cut)


@case("safetensors", "cut to half, through the console (`python -m viper_jax convert hf-to-orbax`)")
def _(shared: Shared, tmp: Path):
    model = copy_model(shared, tmp)
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    argv = ["convert", "hf-to-orbax", "--hf_dir", str(model), "--out", str(tmp / "orbax")]
    return console("viper_jax", argv, tmp), [str(path)]


@case("safetensors", "cut inside the 8-byte header length")
def _(shared: Shared, tmp: Path):
    return _damaged_weights(shared, tmp, lambda p: p.write_bytes(p.read_bytes()[:5]))


@case("safetensors", "zero bytes")
def _(shared: Shared, tmp: Path):
    return _damaged_weights(shared, tmp, lambda p: p.write_bytes(b""))


@case("safetensors", "header length larger than the file")
def _(shared: Shared, tmp: Path):
    return _damaged_weights(shared, tmp, lambda p: p.write_bytes(struct.pack("<Q", 10**12) + p.read_bytes()[8:]))


@case("safetensors", "header bytes not JSON")
def _(shared: Shared, tmp: Path):
    def garble(p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[8:40] = b"\xff" * 32
        p.write_bytes(bytes(data))
    return _damaged_weights(shared, tmp, garble)


@case("safetensors", "a tensor's data_offsets past the end")
def _(shared: Shared, tmp: Path):
    def stretch(p: Path) -> None:
        header, body = safetensors_parts(p)
        name = next(k for k in sorted(header) if k != "__metadata__")
        header[name]["data_offsets"][1] += 10**6
        write_safetensors(p, header, body)
    return _damaged_weights(shared, tmp, stretch)


@case("safetensors", "unsupported dtype")
def _(shared: Shared, tmp: Path):
    def retype(p: Path) -> None:
        header, body = safetensors_parts(p)
        header[next(k for k in sorted(header) if k != "__metadata__")]["dtype"] = "F8_E4M3X"
        write_safetensors(p, header, body)
    return _damaged_weights(shared, tmp, retype)


@case("safetensors", "a tensor missing")
def _(shared: Shared, tmp: Path):
    name = "model.norm.weight"

    def drop(p: Path) -> None:
        header, body = safetensors_parts(p)
        header = {k: v for k, v in header.items() if not k.endswith(name)}
        write_safetensors(p, header, body)
    outcome, _ = _damaged_weights(shared, tmp, drop)
    return outcome, [str(tmp / "model"), name]


@case("safetensors", "a tensor of the wrong shape")
def _(shared: Shared, tmp: Path):
    def reshape(p: Path) -> None:
        header, body = safetensors_parts(p)
        key = next(k for k in sorted(header) if k.endswith("model.norm.weight"))
        n = header[key]["shape"][0]
        header[key]["shape"] = [n // 2, 2]
        write_safetensors(p, header, body)
    outcome, _ = _damaged_weights(shared, tmp, reshape)
    return outcome, ["norm.weight", str(tmp / "model")]


def _sharded(shared: Shared, tmp: Path, damage: Callable[[Path], None]) -> tuple[Outcome, list[str]]:
    """The single file split into two shards with an index, as sharded hub checkpoints are, then damaged."""
    model = copy_model(shared, tmp)
    header, body = safetensors_parts(model / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        sub, chunks, offset = {}, [], 0
        for k in part:
            b, e = header[k]["data_offsets"]
            sub[k] = {**header[k], "data_offsets": [offset, offset + e - b]}
            chunks.append(body[b:e])
            offset += e - b
            weight_map[k] = fname
        write_safetensors(model / fname, sub, b"".join(chunks))
    (model / "model.safetensors").unlink()
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    damage(model)
    return convert_hf(model, tmp), [str(index)]


@case("safetensors index", "a shard it names is missing")
def _(shared: Shared, tmp: Path):
    outcome, _ = _sharded(shared, tmp, lambda m: (m / "model-00002-of-00002.safetensors").unlink())
    return outcome, [str(tmp / "model" / "model-00002-of-00002.safetensors")]


@case("safetensors index", "not JSON")
def _(shared: Shared, tmp: Path):
    return _sharded(shared, tmp, lambda m: (m / "model.safetensors.index.json").write_text('{"weight_map": {'))


@case("safetensors index", "no weight_map key")
def _(shared: Shared, tmp: Path):
    return _sharded(shared, tmp, lambda m: (m / "model.safetensors.index.json").write_text('{"metadata": {}}'))


@case("safetensors index", "one shard left out of weight_map")
def _(shared: Shared, tmp: Path):
    def remap(m: Path) -> None:
        index = m / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v.startswith("model-00002")}
        index.write_text(json.dumps(data))
    outcome, _ = _sharded(shared, tmp, remap)
    return outcome, [str(tmp / "model")]


@case("model config.json", "missing")
def _(shared: Shared, tmp: Path):
    model = copy_model(shared, tmp)
    (model / "config.json").unlink()
    return convert_hf(model, tmp), [str(model / "config.json")]


@case("model config.json", "not JSON")
def _(shared: Shared, tmp: Path):
    model = copy_model(shared, tmp)
    (model / "config.json").write_text('{"model_type": "qwen2_5_vl",')
    return convert_hf(model, tmp), [str(model / "config.json")]


@case("model config.json", "another model_type")
def _(shared: Shared, tmp: Path):
    model = copy_model(shared, tmp)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return convert_hf(model, tmp), ["llama"]


# ------------------------------------------------------------------------------------------ Orbax steps

def _damaged_step(shared: Shared, tmp: Path, damage: Callable[[Path], None], *extra: str
                  ) -> tuple[Outcome, list[str]]:
    ckpt = Path(shutil.copytree(shared.ckpt, tmp / "ckpt"))
    damage(ckpt / "2")
    return convert_orbax(ckpt, tmp, *extra), [str(ckpt / "2")]


def _params_files(step: Path) -> list[Path]:
    """The files holding a step's params arrays (OCDBT data files), largest first."""
    files = [p for p in (step / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


@case("Orbax step", "params data file cut to half")
def _(shared: Shared, tmp: Path):
    def cut(step: Path) -> None:
        f = _params_files(step)[0]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return _damaged_step(shared, tmp, cut)


@case("Orbax step", "params data file deleted")
def _(shared: Shared, tmp: Path):
    return _damaged_step(shared, tmp, lambda step: _params_files(step)[0].unlink())


@case("Orbax step", "params data file overwritten with zeros")
def _(shared: Shared, tmp: Path):
    def zero(step: Path) -> None:
        f = _params_files(step)[0]
        f.write_bytes(b"\0" * f.stat().st_size)
    return _damaged_step(shared, tmp, zero)


@case("Orbax step", "params folder deleted")
def _(shared: Shared, tmp: Path):
    return _damaged_step(shared, tmp, lambda step: shutil.rmtree(step / "params"))


@case("Orbax step", "model_config item deleted")
def _(shared: Shared, tmp: Path):
    return _damaged_step(shared, tmp, lambda step: shutil.rmtree(step / "model_config"))


@case("Orbax step", "model_config JSON cut short")
def _(shared: Shared, tmp: Path):
    def cut(step: Path) -> None:
        for f in (step / "model_config").rglob("*"):
            if f.is_file():
                f.write_text(f.read_text()[:20])
    return _damaged_step(shared, tmp, cut)


@case("Orbax step", "the step asked for (--step 7) absent")
def _(shared: Shared, tmp: Path):
    outcome, _ = _damaged_step(shared, tmp, lambda step: None, "--step", "7")
    return outcome, ["step 7", str(tmp / "ckpt")]


@case("Orbax checkpoint", "folder without any step")
def _(shared: Shared, tmp: Path):
    (tmp / "empty").mkdir()
    return convert_orbax(tmp / "empty", tmp), [str(tmp / "empty")]
