"""`viper train` over two JAX processes (2 CPU devices each, jax.distributed over gloo on localhost)
against one process with the same 4 devices reading the same records in the same global order.

Data: each process reads every other record (shuffle off), so process 0 gets the even records and
process 1 the odd ones. The two differ on purpose: odd records have wider images (84x56, 24 patches,
against 56x56, 16) and a longer caption (length bucket 256 against 192), so the processes must agree
on a prompt width and pad their pixel blocks differently; and one odd caption_refine record is corrupt,
so process 1 skips it and the two processes' data positions differ (the checkpoint must keep both).
The single-process reference reads a copy of the records written in the order the two processes'
batches form the global batch. rl.num_minibatches=1: with several minibatches a multi-process
minibatch takes the m-th block of every process's prompts (grpo_multihost.py), which is not a
contiguous run of the same global batch, so the updates would differ by design.

The multi-process run is SIGKILLed (both processes) after checkpoint 2 and restarted; it must resume
mid-stage from every process's own data position and end where the reference ends.

Packed (rl.packing): two processes whose packed micro-batch counts differ must end with the parameters of
one process packed and of one process unpacked (the same global order, 1e-5).

Tolerances: parameters after 2 and after 5 steps within 1e-5 (fp32). Both runs compute the same
global programs on 4 devices, but through different collective implementations (in-process CPU
collectives against gloo between processes) and different input layouts (host NumPy replicated by jit
against arrays sharded by process), so reductions such as the gradient all-reduce may add their four
partial sums in another order: last-ulp differences, which Adam's normalised steps keep near the
learning rate times 1e-6. Sampled tokens and rewards are compared exactly (a token flip would show).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from grpo_tiny import ROOT, subprocess_env, train_command

STEPS = {"caption_refine": 4, "visual_ops": 1}
RUN = [f"--config.stages.{name}.steps={n}" for name, n in STEPS.items()] + [
    "--config.checkpoint.every_steps=2", "--config.stages.caption_refine.reward=toy_letters",
    "--config.stages.visual_ops.reward=toy_letters", "--config.optim.learning_rate=3e-2",
    "--config.rl.num_minibatches=1", "--config.data.shuffle=false", "--config.checkpoint.keep=5"]
FINAL = sum(STEPS.values())
PER_TASK = 8
BAD = {"caption_refine": {3}, "visual_ops": set()}  # record 3 goes to process 1, which must skip it


# ---------------------------------------------------------------------------------------------- records

def _png(seed: int, size: tuple[int, int], edit: bool = False) -> bytes:
    import io

    from PIL import Image, ImageDraw

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, (37 * seed) % 256)], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(0, 0, 255) if edit else (255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _entry(task: str, i: int) -> bytes:
    from viper_common import records

    if i in BAD[task]:
        return b"not a viper record"
    size = (84, 56) if i % 2 else (56, 56)
    if task == "caption_refine":
        longer = " It is a long caption with many words in it." if i % 2 else ""  # bucket 256, not 192
        caption = f"A gradient with a blue ellipse, picture {i}.{longer}"
        rec = records.ViperRecord(id=f"csr-{i:04d}", task=task, images=[_png(i, size)], caption=caption,
                                  truth=["The ellipse is red.", f"The picture number is {i}."])
    else:
        rec = records.ViperRecord(id=f"vop-{i:04d}", task=task, images=[_png(i, size), _png(i, size, edit=True)],
                                  truth=["Recolour the ellipse from red to blue."])
    return records.encode(rec)


def _write(directory: Path, order: dict[str, list[int]]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    for task, indices in order.items():
        path = directory / f"{task}-00000-of-00001" / "part-00000.arrayrecord"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for i in indices:
            writer.write(_entry(task, i))
        writer.close()


def _global_order(task: str, steps: int, processes: int = 2, per_process: int = 2) -> list[int]:
    """Record indices of the global batches: each process reads records p, p+n, ... (shuffle off,
    repeated per epoch), minus the bad ones, in batches of `per_process`; a global batch is the
    processes' batches in process order (the CPU mesh puts process 0's devices first)."""
    streams = []
    for p in range(processes):
        mine = [i for i in range(p, PER_TASK, processes) if i not in BAD[task]]
        streams.append([mine[k % len(mine)] for k in range(steps * per_process)])
    return [i for s in range(steps) for p in range(processes)
            for i in streams[p][s * per_process:(s + 1) * per_process]]


# ---------------------------------------------------------------------------------------------- runs

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(data: Path, cache: Path, devices: int) -> dict[str, str]:
    env = subprocess_env(data, cache)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    return env


def _start(workdir: Path, env: dict[str, str], processes: int, log: Path,
           run: list[str] = RUN) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(processes):
        extra = [f"--config.export.hf_dir={workdir / 'hf'}"] + ([] if processes == 1 else [
            f"--config.distributed.coordinator=127.0.0.1:{port}", f"--config.distributed.num_processes={processes}",
            f"--config.distributed.process_id={i}", "--config.distributed.cpu_collectives=gloo",
            "--config.distributed.timeout_s=120"])
        out = open(log.with_suffix(f".{i}.log"), "a")
        procs.append(subprocess.Popen(train_command(workdir, run + extra), env=env, cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        out.close()
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # each in its own process group: no worker is left behind
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _finish(procs: list[subprocess.Popen], log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _kill(procs)
    logs = [log.with_suffix(f".{i}.log").read_text()[-3000:] for i in range(len(procs))]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)


def _committed(workdir: Path, step: int) -> bool:
    return (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists()


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """A checkpoint's parameters on this process's one device (whatever mesh wrote them)."""
    path = workdir / "checkpoints" / str(step) / "params"
    checkpointer = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          checkpointer.metadata(path).item_metadata)
    params = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# The key bias gets an exactly zero gradient (it adds q.b_k to every logit of a query's softmax row,
# which cancels), so its gradient is pure rounding noise and Adam, which normalises each coordinate,
# turns that noise into steps that differ between any two summation orders. Compared separately.
NOISE_ONLY = "['language_model']['layers']['self_attn']['k_proj']['bias']"


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], skip: str | None = NOISE_ONLY) -> float:
    assert a.keys() == b.keys() and len(a) > 10 and (skip is None or skip in a)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a if k != skip)


# ---------------------------------------------------------------------------------------------- pieces (fast)

def test_block_vision_inputs_equal_the_concatenated_images():
    """Three 'processes' with different image sets (one with none), pixel blocks padded with NaN rows:
    the vision tower's output equals the one over the plain concatenation, bitwise (same arithmetic;
    a NaN would show if a padding row were ever read)."""
    from flax import nnx

    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.models.qwen2_5_vl import prepare_vision
    from viper_jax.models.qwen2_5_vl.vision import VisionTower
    from viper_jax.distributed import block_vision_inputs
    from viper_jax.tiny import tiny_model_config

    cfg = tiny_model_config(build_tiny_tokenizer()).vision
    tower = VisionTower(cfg, rngs=nnx.Rngs(0))
    grids = [np.asarray([[1, 4, 4], [1, 4, 6]]), np.zeros((0, 3), np.int64), np.asarray([[1, 6, 4], [2, 4, 4]])]
    rng = np.random.default_rng(0)
    pixels = [rng.normal(size=(int(g.prod(axis=1).sum()), cfg.patch_dim)).astype(np.float32) for g in grids]
    block = 64  # the largest set (56 rows) plus padding
    padded = np.full((len(grids) * block, cfg.patch_dim), np.nan, np.float32)  # padding rows are poison
    for k, p in enumerate(pixels):
        padded[k * block:k * block + len(p)] = p
    got = tower(padded, block_vision_inputs(grids, block, cfg))
    want = tower(np.concatenate(pixels), prepare_vision(np.concatenate(grids), cfg))
    assert got.shape == want.shape == ((16 + 24 + 24 + 32) // 4, cfg.out_hidden_size)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="more than the block"):
        block_vision_inputs(grids, 40, cfg)


def test_one_process_blocks_and_the_refusals():
    from viper_jax.distributed import ProcessBlocks, allgather_json, allgather_ragged
    from viper_jax.sharding import make_mesh
    from viper_jax.train.config import ConfigError, base_config
    from viper_jax.train.grpo_multihost import check_split
    from viper_jax.train.resume import own_data_state

    blocks = ProcessBlocks.of(make_mesh((1, 1, 1)))
    assert (blocks.order, blocks.position, blocks.per_process) == ((0,), 0, 1)
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(blocks.local(blocks.put(x, axis=1), axis=1), x)
    assert [a.tolist() for a in allgather_ragged(np.arange(3))] == [[0, 1, 2]]
    assert allgather_json({"ids": ["a"]}) == [{"ids": ["a"]}]

    state = {"parent": {"next_index": 4}, "skip_stats": {"seen": 4, "skipped": {}}}
    assert own_data_state(state) == state and own_data_state(None) is None
    with pytest.raises(ConfigError, match="written by 2 process"):
        own_data_state({"process_count": 2, "processes": [state, state]})

    # Two processes with two batch shards each: a micro-batch of 2 prompts cannot split over 4 shards.
    two = ProcessBlocks(blocks.mesh, blocks.spec, (0, 1), 0, 2)
    rl = base_config().rl
    rl.prompts_per_step, rl.num_minibatches = 8, 4
    with pytest.raises(ConfigError, match="must be a multiple of the mesh's 4 batch shards"):
        check_split(rl, two)
    rl.num_minibatches = 2
    check_split(rl, two)


@pytest.mark.slow  # 3 to 5 minutes here: three `viper train` launches, two of them two processes
def test_two_processes_match_one_and_resume_after_sigkill(tmp_path):
    multi_data, ref_data = tmp_path / "data_multi", tmp_path / "data_ref"
    _write(multi_data, {task: list(range(PER_TASK)) for task in STEPS})
    _write(ref_data, {task: _global_order(task, n) for task, n in STEPS.items()})
    ref, multi = tmp_path / "ref", tmp_path / "multi"

    _finish(_start(ref, _env(ref_data, tmp_path / "cache1", 4), 1, tmp_path / "ref"), tmp_path / "ref")

    env = _env(multi_data, tmp_path / "cache2", 2)
    procs = _start(multi, env, 2, tmp_path / "multi")
    try:
        deadline = time.monotonic() + 400
        while not _committed(multi, 2):
            assert all(p.poll() is None for p in procs), (tmp_path / "multi.0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint 2 within 400 s"
            time.sleep(0.05)
    finally:
        _kill(procs)
    assert not _committed(multi, 4), "the run reached checkpoint 4 before the kill: resume would not be mid-stage"
    before_kill = _metrics(multi)
    _finish(_start(multi, env, 2, tmp_path / "resume"), tmp_path / "resume")
    assert "resumed from" in (tmp_path / "resume.0.log").read_text()

    ref_rows, multi_rows = _metrics(ref), _metrics(multi)
    assert [r["step"] for r in multi_rows] == list(range(1, FINAL + 1))  # each step once, after the resume
    for a, b in zip(ref_rows, multi_rows):
        assert a["record_ids"] == b["record_ids"] and a["stage"] == b["stage"], a["step"]
        # Same samples, same rewards: exact (a different token anywhere would change them).
        for key in ("reward/mean", "reward/std", "response_length/mean"):
            assert a[key] == b[key], (a["step"], key)
        assert abs(a["update/grad_norm"] - b["update/grad_norm"]) <= 1e-5 * a["update/grad_norm"], a["step"]
    for row in before_kill:
        assert row["record_ids"] == ref_rows[row["step"] - 1]["record_ids"]
    assert multi_rows[0]["data/skipped"] == 1  # process 1 skipped the corrupt record, and the sum reached process 0

    p_ref, p_multi = {s: _params(ref, s) for s in (2, FINAL)}, {s: _params(multi, s) for s in (2, FINAL)}
    diff_2, diff_final = _max_diff(p_ref[2], p_multi[2]), _max_diff(p_ref[FINAL], p_multi[FINAL])
    noise = float(np.abs(p_ref[FINAL][NOISE_ONLY] - p_multi[FINAL][NOISE_ONLY]).max())
    print(f"max |param diff| after 2 steps {diff_2:.3g}, after {FINAL} (killed and resumed) {diff_final:.3g}; "
          f"zero-gradient key bias {noise:.3g}")
    assert diff_2 <= 1e-5 and diff_final <= 1e-5
    assert noise <= 1e-3  # noise-driven Adam steps: well below the 3e-2 learning rate, not a different update
    assert _max_diff(p_ref[2], p_ref[FINAL]) > 1e-3  # not vacuous: training moved the parameters

    # The export at the end: every process takes part in its gathers, process 0 writes the same tensors.
    from safetensors.numpy import load_file

    hf_ref, hf_multi = load_file(ref / "hf" / "model.safetensors"), load_file(multi / "hf" / "model.safetensors")
    assert hf_ref.keys() == hf_multi.keys() and len(hf_ref) > 10
    assert any(name.endswith("k_proj.bias") for name in hf_ref)
    for name in hf_ref:  # the zero-gradient key bias to the noise bound above, every other tensor to 1e-5
        atol = 1e-3 if name.endswith("k_proj.bias") else 1e-5
        np.testing.assert_allclose(hf_multi[name], hf_ref[name], rtol=0, atol=atol, err_msg=name)


# Packed: 2 caption_refine steps, then 1 visual_ops (two images a prompt). The tiny config's warmup gives update 1
# learning rate 0, so parameters are compared after steps 2 and 3. One length bucket of 384 (no auto buckets)
# makes every packed row 400 tokens, so two even (shorter-prompt) caption sequences share a row and odd ones do
# not; a budget of 3200 tokens is 4 rows a process (8 in one process): process 0 packs its 2 prompts into 1
# micro-batch, process 1 needs 2, and the single-process run cuts its 4 prompts 3 + 1 (visual_ops prompts are
# shorter: one micro-batch everywhere). Tolerance: packed against unpacked sums in another order (attention over
# packed rows, the embedding gradient's scatter), and Adam's first real step can magnify that in a few embedding
# entries whose gradients nearly cancel: up to ~4e-5 (one process as much as two) when that step is visual_ops',
# ~1e-6 here, where it is caption_refine's.
PACKED_STEPS = {"caption_refine": 2, "visual_ops": 1}
PACKED = RUN + [f"--config.stages.{name}.steps={n}" for name, n in PACKED_STEPS.items()] + [
    "--config.data.auto_buckets=0", "--config.data.length_buckets=(384,)", "--config.checkpoint.every_steps=2"]


@pytest.mark.slow  # three `viper train` launches, ~2.5 minutes here: unpacked and packed in one process, packed in two
def test_two_processes_packed_match_one_packed_and_unpacked(tmp_path):
    """rl.packing over two processes whose micro-batch counts differ (the short one runs an empty micro-batch,
    every micro-batch padded to the larger shapes): the same parameters (1e-5, fp32) after steps 2 and 3 as one
    process packed and as one process unpacked on the same global order, and the same samples and rewards."""
    multi_data, ref_data = tmp_path / "data_multi", tmp_path / "data_ref"
    _write(multi_data, {task: list(range(PER_TASK)) for task in PACKED_STEPS})
    _write(ref_data, {task: _global_order(task, n) for task, n in PACKED_STEPS.items()})
    packed = PACKED + ["--config.rl.packing=true", "--config.rl.pack_tokens=3200"]
    runs = {"unpacked": (ref_data, 4, 1, PACKED), "packed": (ref_data, 4, 1, packed),
            "multi": (multi_data, 2, 2, packed)}
    for name, (data, devices, processes, run) in runs.items():  # one at a time: two shared cores
        env = _env(data, tmp_path / f"cache{processes}", devices)  # the one-process runs share their rollout programs
        _finish(_start(tmp_path / name, env, processes, tmp_path / name, run), tmp_path / name)
    log = (tmp_path / "multi.0.log").read_text()
    assert "different numbers of micro-batches (by block: [[1], [2]])" in log, log[-3000:]

    final = sum(PACKED_STEPS.values())
    rows = {name: _metrics(tmp_path / name) for name in runs}
    assert [r["step"] for r in rows["multi"]] == list(range(1, final + 1))
    for name in ("packed", "unpacked"):
        for a, b in zip(rows[name], rows["multi"]):
            assert a["record_ids"] == b["record_ids"], (name, a["step"])
            for key in ("reward/mean", "reward/std", "response_length/mean"):  # same samples: exact
                assert a[key] == b[key], (name, a["step"], key)
            assert abs(a["update/grad_norm"] - b["update/grad_norm"]) <= 1e-5 * a["update/grad_norm"], (name, a["step"])
    params = {name: {s: _params(tmp_path / name, s) for s in (2, final)} for name in runs}
    for name in ("packed", "unpacked"):
        for s in (2, final):
            diff = _max_diff(params[name][s], params["multi"][s])
            noise = float(np.abs(params[name][s][NOISE_ONLY] - params["multi"][s][NOISE_ONLY]).max())
            print(f"multi packed vs one process {name}, step {s}: max |param diff| {diff:.3g}, key bias {noise:.3g}")
            assert diff <= 1e-5 and noise <= 1e-3, (name, s)
    assert _max_diff(params["multi"][2], params["multi"][final]) > 1e-3  # not vacuous: the last update moved them
