"""`viper loop`: ViPER's self-evolution rounds, each step a separate process (docs/loop_and_demo.md).

Round r (directory WORK/round_00r/, with status.json and logs/):
    synth_caption_refine  viper-synth caption-refine --images IMAGES --out synth/  (synthesiser VLM_r)
    synth_visual_ops      viper-synth visual-ops --records synth/ --out synth/      (VLM_r)
    train                 viper train --config TRAIN --workdir train/  (from VLM_r; stage 1, then stage 2)
    export                viper convert orbax-to-hf --ckpt train/checkpoints --out export/
VLM_0 is `models.vlm` (or the tiny VLM of `viper-synth tiny-models` when `models.tiny`); VLM_{r+1} is round
r's export, so the trained policy synthesises the next round's data and goes on training in it.

Resume: steps marked "done" in status.json are skipped; any other step reruns, and each is resumable by
itself (synthesis skips committed chunks, training restores its latest checkpoint, the export is renamed
into place), so rerunning an interrupted loop picks up where it stopped. `synth.mode = "wait"`
(`--wait_for_shards`): a separate GPU job runs synthesis; the loop writes its commands to
synth/REQUEST.json and polls until each job shard's manifest.json says `complete: true`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ml_collections import ConfigDict

from viper_jax.loop_steps import (STEPS, RoundStatus, StepFailed, _command, _synth_finished, _write_json,  # noqa: F401 (STEPS, StepFailed: public here too)
                                  run_logged, run_parallel, synth_state)

TASKS = ("caption_refine", "visual_ops")


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = ""  # required (--workdir)
    c.rounds = 1  # rounds to have finished when the loop exits (counting earlier invocations)
    c.images = ""  # folder of unlabelled images; "{round}" in it becomes the round number
    c.models = ConfigDict(dict(
        vlm="",  # round 0's synthesiser VLM and starting policy: an HF Qwen2.5-VL directory
        t2i="", editor="",  # "" = what the synthesis config names
        tiny=False))  # write tiny random models to WORK/tiny_models and use them (CPU demo and tests)
    c.synth = ConfigDict(dict(
        mode="run",  # "run": the loop runs viper-synth; "wait": a separate job writes the shards
        command="",  # "" = `python -m synthesis_torch` of this interpreter (e.g. another venv's viper-synth)
        config="",  # synthesis config file ("" = the synthesis defaults)
        overrides=(),  # "--config.a.b=v" flags for both stages
        caption_refine_overrides=(), visual_ops_overrides=(),
        num_shards=1,  # job shards per stage (run in parallel); in wait mode 0 = whatever the job used
        devices="",  # e.g. "0,1,2,3": shard i runs with CUDA_VISIBLE_DEVICES=devices[i % len]
        limit=0,  # images per round (0 = all)
        wait_timeout_s=24 * 3600.0, poll_s=30.0))
    c.train = ConfigDict(dict(
        command="",  # "" = `python -m viper_jax` of this interpreter (also runs the export)
        config="",  # viper train config file (required); its stages must be named caption_refine, visual_ops
        overrides=(),  # "--config.a.b=v" flags for viper train
        compilation_cache=True))  # JAX persistent compilation cache in WORK/jax_cache (faster resumes)
    c.echo = True  # stream the subprocesses' output to the console (always written to R/logs/)
    return c


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ConfigDict:
    import importlib.util

    from viper_jax.train.config import apply_overrides, check_keys

    spec = importlib.util.spec_from_file_location(f"_viper_loop_config_{Path(path).stem}", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise FileNotFoundError(f"loop config {path} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    check_keys(config, base_config())
    apply_overrides(config, overrides)
    return config


class Loop:
    def __init__(self, config: ConfigDict, say: Callable[[str], None] = print):
        if not config.workdir:
            raise ValueError("loop config workdir is required (--workdir)")
        if not config.train.config:
            raise ValueError("loop config train.config is required")
        if config.synth.mode not in ("run", "wait"):
            raise ValueError(f"synth.mode must be 'run' or 'wait', got {config.synth.mode!r}")
        if config.synth.mode == "run" and not config.images:
            raise ValueError("loop config images is required (--images DIR)")
        self.c = config
        self.work = Path(config.workdir).absolute()
        self.say = say

    # -------------------------------------------------------------------------------------------- models

    def _tiny_models(self) -> Path:
        root = self.work / "tiny_models"
        if not (root / "tiny_models.json").exists():
            partial = self.work / "tiny_models.partial"
            shutil.rmtree(partial, ignore_errors=True)
            self.say(f"writing tiny random-init models to {root}")
            run_logged(_command(self.c.synth.command, "synthesis_torch") + ["tiny-models", str(partial)],
                       self.work / "logs" / "tiny_models.log", echo=False)
            # tiny_models.json names the partial paths; rewrite it for the final location
            (partial / "tiny_models.json").write_text(json.dumps(
                {"vlm": str(root / "vlm"), "t2i": str(root / "qwen_image"), "editor": str(root / "qwen_image_edit")},
                indent=1))
            os.replace(partial, root)
        return root

    def _models(self, index: int) -> dict[str, str]:
        m = self.c.models
        models = {"vlm": m.vlm, "t2i": m.t2i, "editor": m.editor}
        if m.tiny:
            root = self._tiny_models()
            models = {"vlm": m.vlm or str(root / "vlm"), "t2i": m.t2i or str(root / "qwen_image"),
                      "editor": m.editor or str(root / "qwen_image_edit")}
        if index > 0:
            models["vlm"] = str(self.round_dir(index - 1) / "export")
        if not models["vlm"]:
            raise ValueError("loop config models.vlm is required (or models.tiny=True)")
        models["vlm"] = str(Path(models["vlm"]).absolute())
        return models

    def round_dir(self, index: int) -> Path:
        return self.work / f"round_{index:03d}"

    # -------------------------------------------------------------------------------------------- steps

    def _synth_commands(self, task: str, rd: Path, models: dict[str, str], index: int) -> list[list[str]]:
        s = self.c.synth
        base = _command(s.command, "synthesis_torch")
        if task == "caption_refine":
            args = ["caption-refine", "--images", str(Path(self.c.images.format(round=index)).absolute())]
        else:
            args = ["visual-ops", "--records", str(rd / "synth")]
        args += ["--out", str(rd / "synth")] + (["--config", str(Path(s.config).absolute())] if s.config else [])
        args += [f"--config.models.vlm={models['vlm']}"]
        key = "t2i" if task == "caption_refine" else "editor"
        if models[key]:
            args.append(f"--config.models.{key}={models[key]}")
        args += list(s.overrides) + list(s[f"{task}_overrides"]) + ([f"--limit={s.limit}"] if s.limit else [])
        n = max(int(s.num_shards), 1)
        return [base + args + ([f"--shard_index={i}", f"--num_shards={n}"] if n > 1 else []) for i in range(n)]

    def _synth(self, task: str, rd: Path, models: dict[str, str], index: int) -> dict[str, Any]:
        s, out = self.c.synth, rd / "synth"
        out.mkdir(parents=True, exist_ok=True)
        commands = self._synth_commands(task, rd, models, index)
        if s.mode == "wait":
            return {**self._wait(task, out, commands), "commands": [shlex.join(c) for c in commands]}
        devices = [d.strip() for d in s.devices.split(",") if d.strip()]
        logs = [rd / "logs" / f"synth_{task}_{i}.log" for i in range(len(commands))]
        if len(commands) == 1 and not devices:
            run_logged(commands[0], logs[0], echo=self.c.echo, prefix=f"  [{task}] ")
        else:
            self.say(f"  {len(commands)} {task} job shards in parallel; logs: {logs[0].parent}/synth_{task}_*.log")
            envs = [dict(os.environ, **({"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} if devices else {}))
                    for i in range(len(commands))]
            run_parallel(commands, logs, envs)
        state = _synth_finished(out, task, len(commands))
        if state is None:
            raise StepFailed(f"{task} synthesis exited without complete manifests in {out}")
        if state["num_records"] == 0:
            raise StepFailed(f"{task} synthesis made no records (rejects: {state['num_rejects']}); "
                             f"see `viper-synth summary {out}`")
        return {**state, "commands": [shlex.join(c) for c in commands]}

    def _wait(self, task: str, out: Path, commands: list[list[str]]) -> dict[str, Any]:
        s = self.c.synth
        request = out / "REQUEST.json"
        payload = json.loads(request.read_text()) if request.exists() else {}
        payload[task] = [shlex.join(c) for c in commands]
        _write_json(request, payload)
        expected = int(s.num_shards) if s.num_shards > 0 else 0
        self.say(f"waiting up to {s.wait_timeout_s} s for {task} shards in {out}; the job to run is:\n  "
                 + "\n  ".join(payload[task]))
        deadline = time.time() + float(s.wait_timeout_s)
        while (state := _synth_finished(out, task, expected)) is None:
            if time.time() > deadline:
                raise TimeoutError(f"no complete {task} shards in {out} after {s.wait_timeout_s} s "
                                   f"(now {synth_state(out, task)}); rerun the loop to go on waiting")
            time.sleep(float(s.poll_s))
        return state

    def _train(self, rd: Path, models: dict[str, str]) -> dict[str, Any]:
        t = self.c.train
        cmd = _command(t.command, "viper_jax") + [
            "train", "--config", str(Path(t.config).absolute()), "--workdir", str(rd / "train"),
            f"--config.model.path={models['vlm']}", f"--config.model.tokenizer_path={models['vlm']}",
            "--config.model.tiny_init=False"]
        for task in TASKS:
            cmd.append(f"--config.stages.{task}.data_globs={(str(rd / 'synth' / f'{task}-*' / 'part-*.arrayrecord'),)!r}")
        env = dict(os.environ)
        if t.compilation_cache:
            env.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.work / "jax_cache"))
        run_logged(cmd + list(t.overrides), rd / "logs" / "train.log", env, echo=self.c.echo, prefix="  [train] ")
        metrics = [json.loads(line) for line in (rd / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = {}
        for m in metrics:
            last[m.get("stage", "?")] = {k: m[k] for k in ("step", "reward/mean", "format_rate") if k in m}
        return {"checkpoints": str(rd / "train" / "checkpoints"), "steps": metrics[-1]["step"] if metrics else 0,
                "last_metrics": last, "command": shlex.join(cmd + list(t.overrides))}

    def _export(self, rd: Path, models: dict[str, str]) -> dict[str, Any]:
        final, partial = rd / "export", rd / "export.partial"
        for d in (final, partial):  # an earlier attempt that did not reach "done": redo it
            shutil.rmtree(d, ignore_errors=True)
        cmd = _command(self.c.train.command, "viper_jax") + [
            "convert", "orbax-to-hf", "--ckpt", str(rd / "train" / "checkpoints"), "--out", str(partial),
            "--tokenizer_dir", models["vlm"]]
        run_logged(cmd, rd / "logs" / "export.log", echo=self.c.echo, prefix="  [export] ")
        os.replace(partial, final)
        return {"hf_dir": str(final), "command": shlex.join(cmd)}

    # -------------------------------------------------------------------------------------------- rounds

    def run_round(self, index: int) -> RoundStatus:
        rd = self.round_dir(index)
        rd.mkdir(parents=True, exist_ok=True)
        models = self._models(index)
        status = RoundStatus(rd, index, models["vlm"])
        for task in TASKS:
            status.run(f"synth_{task}", lambda task=task: self._synth(task, rd, models, index), self.say)
        status.run("train", lambda: self._train(rd, models), self.say)
        status.run("export", lambda: self._export(rd, models), self.say)
        return status

    def run(self) -> list[RoundStatus]:
        self.work.mkdir(parents=True, exist_ok=True)
        _write_json(self.work / "loop_config.json", json.loads(self.c.to_json_best_effort()))
        out = []
        for index in range(int(self.c.rounds)):
            out.append(self.run_round(index))
        self.say(f"{len(out)} round(s) done; latest policy: {self.round_dir(len(out) - 1) / 'export'}")
        return out


# ------------------------------------------------------------------------------------------------ CLI

def add_loop_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loop", help="ViPER self-evolution rounds: synthesise -> train -> export -> repeat",
                       description="Extra arguments --config.a.b=value override single loop config fields.")
    p.add_argument("--config", required=True, help="loop config file (configs/loop_tiny.py, configs/loop_7b.py)")
    p.add_argument("--workdir", default=None, help="= --config.workdir")
    p.add_argument("--rounds", type=int, default=None, help="= --config.rounds")
    p.add_argument("--images", default=None, help="= --config.images")
    p.add_argument("--wait_for_shards", action="store_true",
                   help="do not run synthesis: wait for a separate job's shards (= --config.synth.mode=wait)")
    p.add_argument("--quiet", action="store_true", help="do not echo the steps' output (logs are still written)")
    p.set_defaults(accepts_config_overrides=True)


def run_loop_cli(args: argparse.Namespace) -> None:
    config = load_config(args.config, getattr(args, "overrides", []))
    for key in ("workdir", "rounds", "images"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.wait_for_shards:
        config.synth.mode = "wait"
    if args.quiet:
        config.echo = False
    run_interruptible(Loop(config).run, "viper loop")


def run_interruptible(fn: Callable[[], Any], name: str) -> Any:
    """Runs `fn` with SIGTERM (preemption, `kill`) handled like Ctrl-C: the running step's subprocess is
    stopped and its status says "interrupted"; errors of a step end the program with their message."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return fn()
    except KeyboardInterrupt:
        raise SystemExit(f"{name}: interrupted; run the same command again to resume") from None
    except (StepFailed, TimeoutError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{name}: {e}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
