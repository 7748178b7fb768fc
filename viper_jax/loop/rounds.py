"""One round of `viper loop` after another, each step a separate process: synthesis (`viper-synth`), training
(`viper train`), export (`viper convert`). The package docstring (viper_jax/loop/__init__.py) gives the steps."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ml_collections import ConfigDict

from viper_common.atomic_files import remove_stale_temporaries
from viper_common.kill_points import kill_point
from viper_jax.loop.processes import command_line, run_logged, run_parallel
from viper_jax.loop.status import RoundStatus, StepFailed, synth_finished, synth_state, write_json
from viper_jax.train.config import override_flags
from viper_jax.train.metrics import read_metrics

TASKS = ("caption_refine", "visual_ops")


class Loop:
    def __init__(self, config: ConfigDict, say: Callable[[str], None] = print):
        if not config.workdir:
            raise ValueError("loop config workdir is required (--workdir)")
        if not config.train.config:
            raise ValueError("loop config train.config is required")
        if config.synth.mode not in ("run", "wait"):
            raise ValueError(f"synth.mode must be 'run' or 'wait', got {config.synth.mode!r}")
        if config.empty_stage not in ("stop", "skip"):
            raise ValueError(f"empty_stage must be 'stop' or 'skip', got {config.empty_stage!r}")
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
            run_logged(command_line(self.c.synth.command, "synthesis_torch") + ["tiny-models", str(partial)],
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
        base = command_line(s.command, "synthesis_torch")
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
        remove_stale_temporaries(out)  # REQUEST.json's (job folders clean up after themselves)
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
        state = synth_finished(out, task, len(commands))
        if state is None:
            raise StepFailed(f"{task} synthesis exited without complete manifests in {out}")
        if state["num_records"] == 0:
            message = (f"{task} synthesis made no records (rejects: {state['num_rejects']}); "
                       f"see `viper-synth summary {out}`")
            if self.c.empty_stage != "skip":
                raise StepFailed(message)
            self.say(f"  {message}; the stage is skipped in this round's training (empty_stage=skip)")
            state = {**state, "skipped_in_training": True}
        return {**state, "commands": [shlex.join(c) for c in commands]}

    def _wait(self, task: str, out: Path, commands: list[list[str]]) -> dict[str, Any]:
        s = self.c.synth
        request = out / "REQUEST.json"
        payload = json.loads(request.read_text()) if request.exists() else {}
        payload[task] = [shlex.join(c) for c in commands]
        write_json(request, payload)
        expected = int(s.num_shards) if s.num_shards > 0 else 0
        self.say(f"waiting up to {s.wait_timeout_s} s for {task} shards in {out}; the job to run is:\n  "
                 + "\n  ".join(payload[task]))
        deadline = time.time() + float(s.wait_timeout_s)
        while (state := synth_finished(out, task, expected)) is None:
            if time.time() > deadline:
                raise TimeoutError(f"no complete {task} shards in {out} after {s.wait_timeout_s} s "
                                   f"(now {synth_state(out, task)}); rerun the loop to go on waiting")
            time.sleep(float(s.poll_s))
        return state

    def _train(self, rd: Path, models: dict[str, str], stages: Sequence[str] = TASKS) -> dict[str, Any]:
        t = self.c.train
        values: dict[str, Any] = {"model.path": models["vlm"], "model.tokenizer_path": models["vlm"],
                                  "model.tiny_init": False}
        if tuple(stages) != TASKS:  # a stage without records (empty_stage=skip) is left out of the order
            values["stage_order"] = tuple(stages)
        for task in TASKS:
            values[f"stages.{task}.data_globs"] = (str(rd / "synth" / f"{task}-*" / "part-*.arrayrecord"),)
        cmd = command_line(t.command, "viper_jax") + [
            "train", "--config", str(Path(t.config).absolute()), "--workdir", str(rd / "train"),
            *override_flags(values)]
        env = dict(os.environ)
        if t.compilation_cache:
            env.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.work / "jax_cache"))
        run_logged(cmd + list(t.overrides), rd / "logs" / "train.log", env, echo=self.c.echo, prefix="  [train] ")
        metrics = read_metrics(rd / "train" / "metrics.jsonl")  # without a half-written last line
        last = {}
        for m in metrics:
            last[m.get("stage", "?")] = {k: m[k] for k in ("step", "reward/mean", "format_rate") if k in m}
        return {"checkpoints": str(rd / "train" / "checkpoints"), "steps": metrics[-1]["step"] if metrics else 0,
                "last_metrics": last, "command": shlex.join(cmd + list(t.overrides))}

    def _export(self, rd: Path, models: dict[str, str]) -> dict[str, Any]:
        final, partial = rd / "export", rd / "export.partial"
        for d in (final, partial):  # an earlier attempt that did not reach "done": redo it
            shutil.rmtree(d, ignore_errors=True)
        cmd = command_line(self.c.train.command, "viper_jax") + [
            "convert", "orbax-to-hf", "--ckpt", str(rd / "train" / "checkpoints"), "--out", str(partial),
            "--tokenizer_dir", models["vlm"]]
        run_logged(cmd, rd / "logs" / "export.log", echo=self.c.echo, prefix="  [export] ")
        kill_point("loop.export_converted")  # the export complete under its partial name
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
        stages = tuple(task for task in TASKS
                       if not status.data["steps"].get(f"synth_{task}", {}).get("skipped_in_training"))

        def train() -> dict[str, Any]:
            if not stages:
                raise StepFailed("no stage of this round has synthesised records; see the synthesis summaries")
            return self._train(rd, models, stages)

        status.run("train", train, self.say)
        status.run("export", lambda: self._export(rd, models), self.say)
        return status

    def run(self) -> list[RoundStatus]:
        self.work.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.work)
        write_json(self.work / "loop_config.json", json.loads(self.c.to_json_best_effort()))
        out = []
        for index in range(int(self.c.rounds)):
            out.append(self.run_round(index))
        self.say(f"{len(out)} round(s) done; latest policy: {self.round_dir(len(out) - 1) / 'export'}")
        return out
