"""The command lines `viper` and `viper-synth` (as the console runs them, in a subprocess): a user's mistake
(a missing file, a bad config key, an unreadable checkpoint) is one line on stderr naming it and exit
status 1, never a traceback; `--debug` shows the traceback. A bug still raises (its traceback is shown)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_tiny import ROOT, TINY_CONFIG, subprocess_env

TIMEOUT = 300


def _run(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _assert_one_line(done: subprocess.CompletedProcess, prog: str, message: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert len(ours) == 1 and message in ours[0] and ours[0].endswith("(--debug shows the traceback)"), done.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return subprocess_env(root / "data", root / "jax_cache")


def test_viper_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, env):
    missing = tmp_path / "missing"
    cases = [
        (["convert", "hf-to-orbax", "--hf_dir", str(missing), "--out", str(tmp_path / "o")], str(missing)),
        (["convert", "orbax-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")],
         f"no Orbax checkpoint steps in {tmp_path}"),
        (["train", "--config", str(TINY_CONFIG), "--config.optim.learnig_rate=1"],
         "unknown config key 'optim.learnig_rate'; did you mean learning_rate"),
        (["train", "--config", str(missing / "config.py")], f"config file {missing / 'config.py'} does not exist"),
    ]
    for args, message in cases:
        _assert_one_line(_run("viper_jax", args, env), "viper", message)
    for args in (["--debug", *cases[0][0]], [*cases[2][0], "--debug"]):  # before the sub-command or after it
        done = _run("viper_jax", args, env)
        assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr, done.stderr[-3000:]
        assert "(--debug shows the traceback)" not in done.stderr


def test_viper_train_on_an_unreadable_checkpoint_is_one_line(tmp_path, env):
    """The workdir's only checkpoint step lacks the trainer's items (a converted model put there): no step
    restores, so `viper train` stops with the step named, not with a traceback nor by starting over."""
    from viper_jax.tiny import write_tiny_model, write_tiny_records

    write_tiny_records(Path(env["VIPER_TINY_DATA"]), per_task=2)
    work = tmp_path / "work"
    model = write_tiny_model(work / "tiny_model")  # what tiny_init would write: the same model
    done = _run("viper_jax", ["convert", "hf-to-orbax", "--hf_dir", str(model), "--out", str(work / "checkpoints"),
                              "--step", "3"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run("viper_jax", ["train", "--config", str(TINY_CONFIG), "--workdir", str(work),
                              "--config.logging.progress_bar=false"], env)
    _assert_one_line(done, "viper", f"no checkpoint in {work / 'checkpoints'} restores (step 3: ")
    assert "does not restore" in done.stderr  # the warning naming the step and its error came first
    assert not (work / "metrics.jsonl").exists() or not (work / "metrics.jsonl").read_text()  # no step trained


def test_viper_synth_user_errors_are_one_line(tmp_path, env):
    missing = tmp_path / "missing"
    args = ["caption-refine", "--images", str(missing), "--out", str(tmp_path / "out")]
    _assert_one_line(_run("synthesis_torch", args, env), "viper-synth", f"image folder {missing} does not exist")
    done = _run("synthesis_torch", ["--debug", *args], env)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr, done.stderr[-3000:]


def test_a_bug_is_not_a_user_error(monkeypatch):
    """Only the errors a user's input causes become one line: anything else keeps its traceback."""
    from viper_common.cli_errors import DEBUG_ENV, is_user_error, one_line, run_console

    monkeypatch.setenv(DEBUG_ENV, "")  # restored afterwards (run_console --debug sets it)

    assert is_user_error(FileNotFoundError(2, "No such file")) and is_user_error(ValueError("bad key"))
    named = type("CheckpointRestoreError", (RuntimeError,), {})
    assert is_user_error(named("none restores")) and not is_user_error(RuntimeError("boom"))
    assert not is_user_error(KeyError("x")) and not is_user_error(AttributeError("y"))
    assert one_line(ValueError("a\n  b")) == "a b"

    def bug(argv):
        raise AttributeError("a bug")

    with pytest.raises(AttributeError):
        run_console("viper", bug, ["train"])
    assert run_console("viper", lambda argv: 0, ["x", "--debug"]) == 0
