"""A resume survives the crash it resumes from (issue 20): a latest checkpoint step that does not restore
(a truncated or deleted array file) is named in a warning and the step before it is used; steps that all
fail are a clear error; a half-written last line of metrics.jsonl (SIGKILL mid-write) is dropped by every
reader; and the resumed run logs each step once (the file cut back atomically to the restored step)."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import pytest

from grpo_tiny import assert_bitwise_equal, raw_checkpoint, tiny_config
from test_sft import jax_cache, metrics, sft_config  # noqa: F401 - jax_cache is a fixture used below
from viper_jax.tiny import write_tiny_instruct_records, write_tiny_model, write_tiny_records

# A failed restore leaves Orbax's other array reads un-awaited; Python reports them when it collects them:
# here, in the test that caused them (below), not in whichever test of another module runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_leftover_reads():
    yield
    gc.collect()


HALF_LINE = '{"step": 99, "loss": 1.25, "tok'  # what a kill during MetricsLogger.write leaves


def _array_files(step_dir: Path) -> list[Path]:
    """The files holding a step's params arrays (OCDBT data files), largest first."""
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _truncate(step_dir: Path) -> Path:
    """Cuts the step's largest params file to half its length (a write the crash did not finish)."""
    victim = _array_files(step_dir)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return victim


def _append_half_line(workdir: Path) -> None:
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(HALF_LINE)


# ------------------------------------------------------------------------------ metrics.jsonl readers

def test_a_half_written_last_line_is_dropped_by_every_reader(tmp_path, caplog):
    from viper_jax.train.metrics import MetricsLogger, read_metrics
    from viper_jax.world.base import _sft_summary

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 3.0 - s, "tokens_per_s": 10.0, "answer_tokens_per_s": 2.0} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + HALF_LINE)
    with caplog.at_level(logging.WARNING):
        assert read_metrics(path) == rows
    assert "cut short" in caplog.text and str(path) in caplog.text
    assert _sft_summary(path)["steps"] == 4 and _sft_summary(path)["last_loss"] == -1.0

    # A bad line before the last is not a crash's leftover: an error naming the line.
    path.write_text(json.dumps(rows[0]) + "\n" + HALF_LINE + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)

    # The resume from step 2: rows of later steps and the half line gone, the file replaced whole.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + HALF_LINE)
    log = MetricsLogger(tmp_path, start_step=2, total_steps=4, tensorboard=False, progress_bar=False)
    log.write(3, {"loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith("\n") and HALF_LINE not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_the_loop_reads_train_metrics_with_a_half_line(tmp_path):
    """viper loop's report reads the round's train/metrics.jsonl through read_metrics (not a raw json.loads)."""
    import inspect

    from viper_jax.loop import demo, rounds

    for module in (rounds, demo):
        source = inspect.getsource(module)
        assert "read_metrics(rd / \"train\" / \"metrics.jsonl\")" in source, module.__name__
        assert "json.loads(line) for line in (rd / \"train\" / \"metrics.jsonl\")" not in source


# ------------------------------------------------------------------------------ viper sft

def test_sft_resumes_from_the_last_step_that_restores(tmp_path, jax_cache, caplog):
    from viper_jax.sft.trainer import train
    from viper_jax.train.resume import CheckpointRestoreError

    write_tiny_instruct_records(tmp_path / "data", count=8, two_images=False)
    run = tmp_path / "run"
    config = lambda: sft_config(run, f"{tmp_path}/data/*/part-*.arrayrecord",
                                ["--config.steps=4", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3",
                                 "--config.data.shuffle=false"])
    assert train(config())["step"] == 4
    want = raw_checkpoint(run, 4, ("train_meta", "data_state"))
    first = metrics(run)

    # The crash: step 4's largest array file cut short, and a half-written metrics line.
    _truncate(run / "checkpoints" / "4")
    _append_half_line(run)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train(config())["step"] == 4
    warned = [r.getMessage() for r in caplog.records if "does not restore (" in r.getMessage()]
    assert len(warned) == 1 and "checkpoints/4 does not restore" in warned[0], caplog.text
    assert "checkpoints/4/params" in warned[0] and "Error reading" in warned[0], warned  # the item's file, the array
    assert "TensorStore({" not in warned[0]  # TensorStore's one-line cause, not its page of spec
    assert "resuming from step 2" in caplog.text and (run / "checkpoints.corrupt" / "4").is_dir()  # kept aside
    # Resumed from step 2 and redone: the same step 4, bit for bit, and each step logged once.
    got = raw_checkpoint(run, 4, ("train_meta", "data_state"))
    assert got["train_meta"] == want["train_meta"] and got["data_state"] == want["data_state"]
    assert_bitwise_equal(want, got)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in first]

    # Every step broken (one file deleted, one truncated): a clear error naming both, nothing moved.
    _array_files(run / "checkpoints" / "2")[0].unlink()
    _truncate(run / "checkpoints" / "4")
    with pytest.raises(CheckpointRestoreError, match=r"no checkpoint in .* restores \(step 4: .*; step 2: "):
        train(config())
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_sft_without_steps_starts_fresh_and_a_model_mismatch_still_stops(tmp_path, jax_cache):
    """No step: a fresh start (no error). A restorable step of another model: ModelMismatchError, not a
    fallback to an older step (a config mistake is not a damaged file)."""
    from viper_jax.sft.trainer import train
    from viper_jax.train.resume import ModelMismatchError

    write_tiny_instruct_records(tmp_path / "data", count=8, two_images=False)
    run = tmp_path / "run"
    config = lambda extra=(): sft_config(run, f"{tmp_path}/data/*/part-*.arrayrecord",
                                         ["--config.steps=2", "--config.checkpoint.every_steps=1", *extra])
    (run / "checkpoints").mkdir(parents=True)  # an empty checkpoint folder: nothing to restore
    assert train(config())["step"] == 2
    other = write_tiny_model(tmp_path / "other", layers=3)
    with pytest.raises(ModelMismatchError, match="num_hidden_layers"):
        train(config([f"--config.model.path={other}", "--config.model.tiny_init=false"]))
    assert not (run / "checkpoints.corrupt").exists()


# ------------------------------------------------------------------------------ viper train

def test_grpo_resumes_from_the_step_before_a_deleted_array_file(tmp_path, jax_cache, capsys, caplog):
    """`viper train`: the latest step missing one of its params files resumes from the step before (the
    resume message names that step), redoes the later steps and logs each step once."""
    from viper_jax.train.trainer import train

    write_tiny_records(tmp_path / "data", per_task=8)
    run = tmp_path / "run"
    config = lambda: tiny_config(run, tmp_path / "data", [
        "--config.stage_order=('caption_refine',)", "--config.stages.caption_refine.steps=3",
        "--config.stages.caption_refine.reward=toy_letters", "--config.checkpoint.every_steps=2",
        "--config.logging.tensorboard=false"])
    assert train(config())["step"] == 3
    first = metrics(run)
    _array_files(run / "checkpoints" / "3")[0].unlink()
    _append_half_line(run)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert train(config())["step"] == 3
    out = capsys.readouterr()
    assert f"resumed from {run / 'checkpoints'}/2 " in out.out + out.err
    assert "checkpoints/3 does not restore (" in caplog.text and "checkpoints/3/params" in caplog.text
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["record_ids"] for r in rows] == [r["record_ids"] for r in first]  # the same data position
    assert rows[2]["reward/mean"] == first[2]["reward/mean"]
