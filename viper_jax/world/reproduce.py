"""The ViPER experiment of issue 18 in ShapeWorld, as a list of subprocess steps (scripts/reproduce.py runs it).

    base      viper world base (unless WORK/base/base_hf exists, or --base_hf names one; --quick builds or
              reuses runs/reproduce/base, the full run's)
    bench     viper world bench
    images    viper world images, one block of synth seeds per round
    per seed  viper loop (R rounds: synthesis -> GRPO stage 1 -> stage 2 -> export; round r+1 synthesises with
              round r's export), then the controls on round 0's synthesised records of that seed:
                sft       viper sft from the base on both tasks' records, the GRPO run's budget
                stage1    viper train, stage_order = (caption_refine,), then viper convert orbax-to-hf
                stage2    viper train, stage_order = (visual_ops,), then viper convert orbax-to-hf
                shuffled  viper world shuffle-truth, then the same viper train (both stages) and convert
    eval      viper eval of the base and of every model on the benchmark's val and test TSVs
    report    WORK/results.json, WORK/report.md, WORK/report/*.png (viper_jax/world/report.py)

Every step is skipped when its output exists, so a killed run resumes: a step that writes a folder writes it under
`<name>.partial` and the driver renames it when the command succeeded; a training run gets a DONE file. Each
step's output goes to WORK/logs/<step>.log; WORK/steps.json records each step's state, wall time and command.
Every step runs with VIPER_JAX_CACHE_DIR=WORK/jax_cache (unless set): one JAX compilation cache for all runs.
A failed step skips the steps that need it; the others go on, and the exit status is 1.

The single-stage controls get the whole GRPO budget (both stages' steps) by default (`single_stage_steps=total`),
so that "both stages beat either alone" is not a comparison of 24 steps against 12; `own` gives them their
stage's steps only (the paper's ablation with the stage removed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
CONTROLS = ("sft", "stage1", "stage2", "shuffled")
TASKS = ("caption_refine", "visual_ops")
EVAL_ARGS = ("--min_pixels", "12544", "--max_pixels", "12544", "--prompt_buckets", "128,192",
             "--max_new_tokens", "48", "--batch_size", "50", "--score_options", "text")


@dataclasses.dataclass
class Settings:
    workdir: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 2
    images: int = 64  # source images per round
    steps: dict[str, int] = dataclasses.field(default_factory=lambda: {"caption_refine": 12, "visual_ops": 12})
    prompts_per_step: int = 8  # configs/world_grpo.py's rl.prompts_per_step (the SFT control's batch)
    controls: tuple[str, ...] = CONTROLS
    single_stage_steps: str = "total"  # "total": both stages' steps; "own": the stage's own
    bench: tuple[int | None, int | None] = (None, None)  # --n_per_category, --val_per_category (None: defaults)
    base_hf: Path | None = None  # an existing base to use instead of building one
    base_workdir: Path | None = None  # where `viper world base` builds it (None: WORK/base)
    base_config: Path = CONFIGS / "world_base.py"
    loop_config: Path = CONFIGS / "loop_world.py"
    grpo_config: Path = CONFIGS / "world_grpo.py"
    sft_config: Path = CONFIGS / "world_sft_control.py"
    quick: bool = False
    step_overrides: bool = False  # pass the stage steps to viper train (True when they differ from the config's)
    train_overrides: tuple[str, ...] = ()  # "--config.a.b=v" flags for every viper train (ViPER's and the controls')

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def quick_settings(workdir: Path) -> Settings:
    """--quick: one seed, one round, few images and steps, the controls but SFT (<= 10 min once the base exists)."""
    return Settings(workdir=workdir, seeds=(0,), rounds=1, images=24, steps={"caption_refine": 3, "visual_ops": 3},
                    controls=("stage1", "stage2", "shuffled"), bench=(40, 20), quick=True, step_overrides=True)


@dataclasses.dataclass
class Step:
    name: str
    cmd: list[str]
    done: Path  # the step's output; exists = skipped
    partial: Path | None = None  # the command writes here; renamed to `done` on success
    mark: bool = False  # the driver writes `done` (a DONE file) on success
    check: Callable[[], bool] | None = None  # overrides `done.exists()`
    needs: tuple[str, ...] = ()  # steps that must have succeeded (or been done before)
    requires: tuple[str, ...] = ()  # globs that must match before it runs (its inputs)
    ready: Callable[[], bool] | None = None  # another condition on its inputs, described by ready_text
    ready_text: str = ""

    def is_done(self) -> bool:
        return self.check() if self.check is not None else self.done.exists()


def viper_command() -> list[str]:
    """The `viper` script next to this interpreter (a venv), else `python -m viper_jax`."""
    script = Path(sys.executable).parent / "viper"
    return [str(script)] if script.exists() else [sys.executable, "-m", "viper_jax"]


def _tuple(values: Sequence[Any]) -> str:
    """A tuple literal with double-quoted strings (what `--config.x=...` parses back with ast.literal_eval),
    readable in a shell command line."""
    items = [json.dumps(v) if isinstance(v, str) else repr(v) for v in values]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _flags(values: dict[str, Any]) -> list[str]:
    """`viper train` flags for `values`, every key checked against its schema first (train.config.override_flags)."""
    from viper_jax.train.config import override_flags

    override_flags(values)  # raises on an unknown key
    return [f"--config.{k}=" + (_tuple(v) if isinstance(v, (tuple, list)) else v if isinstance(v, str) else repr(v))
            for k, v in values.items()]


class Plan:
    def __init__(self, s: Settings, viper: Sequence[str] | None = None):
        self.s = s
        self.w = Path(s.workdir).absolute()
        self.viper = list(viper or viper_command())
        self.base_dir = Path(s.base_workdir).absolute() if s.base_workdir else self.w / "base"
        self.base = Path(s.base_hf).absolute() if s.base_hf else self.base_dir / "base_hf"
        self.steps: list[Step] = []
        self.specs: list[dict[str, Any]] = []  # the report's models
        self.curve_runs: dict[str, dict[str, str]] = {}
        self._build()

    # ------------------------------------------------------------------------------------------ paths

    @property
    def val_tsv(self) -> Path:
        return self.w / "bench" / "shapeworld_val.tsv"

    @property
    def test_tsv(self) -> Path:
        return self.w / "bench" / "shapeworld_test.tsv"

    def seed_dir(self, seed: int) -> Path:
        return self.w / f"viper_seed{seed}"

    def round_dir(self, seed: int, r: int) -> Path:
        return self.seed_dir(seed) / f"round_{r:03d}"

    def control_dir(self, seed: int, kind: str) -> Path:
        return self.w / "controls" / f"seed{seed}" / kind

    def total_steps(self) -> int:
        return sum(self.s.steps[t] for t in TASKS)

    # ------------------------------------------------------------------------------------------ steps

    def add(self, step: Step) -> Step:
        self.steps.append(step)
        return step

    def _eval(self, name: str, model: Path, needs: tuple[str, ...], kind: str, seed: int | None,
              metrics: Path | None = None, trainer: str = "grpo", round_: int | None = None,
              status: Path | None = None) -> None:
        out = self.w / "eval" / f"{name}.json"
        self.add(Step(f"eval_{name}", self.viper + ["eval", "--model", str(model), "--tsv", str(self.val_tsv),
                                                    "--tsv", str(self.test_tsv), "--out",
                                                    str(out.with_suffix(".partial.json")), *EVAL_ARGS],
                      out, partial=out.with_suffix(".partial.json"), needs=needs + ("bench",),
                      requires=(str(model / "config.json"),)))
        self.specs.append({"name": name, "kind": kind, "seed": seed, "round": round_, "model": str(model),
                           "eval": str(out), "metrics": str(metrics) if metrics else None, "trainer": trainer,
                           **({"status": str(status)} if status else {})})

    def _train_flags(self, data: Path, seed: int, stage_order: tuple[str, ...] | None) -> list[str]:
        values: dict[str, Any] = {"model.path": str(self.base), "model.tokenizer_path": str(self.base),
                                  "model.tiny_init": False, "seed": int(seed)}
        for task in TASKS:
            values[f"stages.{task}.data_globs"] = (str(data / f"{task}-*" / "part-*.arrayrecord"),)
        if stage_order is not None:
            values["stage_order"] = stage_order
            steps = self.total_steps() if self.s.single_stage_steps == "total" else self.s.steps[stage_order[0]]
            values[f"stages.{stage_order[0]}.steps"] = int(steps)
            values["checkpoint.every_steps"] = int(steps)
        elif self.s.step_overrides:
            for task in TASKS:
                values[f"stages.{task}.steps"] = int(self.s.steps[task])
            values["checkpoint.every_steps"] = int(min(self.s.steps.values()))
        return _flags(values)

    def _grpo_control(self, seed: int, kind: str, data: Path, stage_order: tuple[str, ...] | None,
                      needs: tuple[str, ...], ready: dict[str, Any]) -> None:
        d = self.control_dir(seed, kind)
        train = self.add(Step(f"{kind}_train_s{seed}", self.viper + [
            "train", "--config", str(self.s.grpo_config), "--workdir", str(d / "train"),
            *self._train_flags(data, seed, stage_order), *self.s.train_overrides], d / "train" / "DONE", mark=True,
            needs=needs,
            requires=tuple(str(data / f"{t}-*" / "part-*.arrayrecord") for t in (stage_order or TASKS)), **ready))
        export = self.add(Step(f"{kind}_export_s{seed}", self.viper + [
            "convert", "orbax-to-hf", "--ckpt", str(d / "train" / "checkpoints"), "--out", str(d / "export.partial"),
            "--tokenizer_dir", str(self.base)], d / "export", partial=d / "export.partial", needs=(train.name,)))
        self._eval(f"{kind}_s{seed}", d / "export", (export.name,), kind, seed, d / "train" / "metrics.jsonl")
        self.curve_runs.setdefault(f"curves_seed{seed}", {})[kind] = str(d / "train" / "metrics.jsonl")

    def _build(self) -> None:
        s, w = self.s, self.w
        base_needs: tuple[str, ...] = ()
        if s.base_hf is None:
            base_dir = self.base_dir
            self.add(Step("base", self.viper + ["world", "base", "--workdir", str(base_dir), "--config",
                                                str(s.base_config)], self.base,
                          check=lambda: self.base.exists() and ((base_dir / "base.json").exists()
                                                                or not (base_dir / "sft").exists())))
            base_needs = ("base",)
        n_cat, n_val = s.bench
        self.add(Step("bench", self.viper + ["world", "bench", "--out", str(w / "bench")]
                      + (["--n_per_category", str(n_cat)] if n_cat else [])
                      + (["--val_per_category", str(n_val)] if n_val else []),
                      w / "bench" / "manifest.json",
                      check=lambda: all(p.exists() for p in (self.val_tsv, self.test_tsv, w / "bench" / "manifest.json"))))
        images = []
        for r in range(s.rounds):
            d = w / "images" / f"round_{r}"
            images.append(self.add(Step(f"images_r{r}", self.viper + ["world", "images", "--out", str(d), "--n",
                                                                      str(s.images), "--block", str(r)], d,
                                        check=lambda d=d: d.is_dir() and len(list(d.glob("*.png"))) >= s.images)).name)
        self._eval("base", self.base, base_needs, "base", None)
        for seed in s.seeds:
            overrides = [f"--config.seed={seed}", *s.train_overrides]
            if s.step_overrides:
                overrides += [f"--config.stages.{t}.steps={s.steps[t]}" for t in TASKS]
                overrides.append(f"--config.checkpoint.every_steps={min(s.steps.values())}")
            last = self.round_dir(seed, s.rounds - 1) / "export"
            self.add(Step(f"loop_s{seed}", self.viper + [
                "loop", "--config", str(s.loop_config), "--workdir", str(self.seed_dir(seed)),
                "--images", str(w / "images" / "round_{round}"), f"--config.models.vlm={self.base}",
                f"--config.rounds={s.rounds}", f"--config.train.overrides={_tuple(overrides)}",
                f"--config.synth.overrides={_tuple([f'--config.seed={seed}'])}"],
                last, needs=base_needs + tuple(images)))
            for r in range(s.rounds):
                rd = self.round_dir(seed, r)
                self._eval(f"viper_s{seed}_r{r}", rd / "export", (), f"viper round {r}", seed,
                           rd / "train" / "metrics.jsonl", round_=r, status=rd / "status.json")
                self.curve_runs.setdefault(f"curves_seed{seed}", {})[f"viper round {r}"] = \
                    str(rd / "train" / "metrics.jsonl")
            r0 = self.round_dir(seed, 0) / "synth"
            # The controls need round 0's records only (not the whole loop): its synthesis steps must be done.
            needs = base_needs
            ready = dict(ready=lambda seed=seed: _synth_done(self.round_dir(seed, 0)),
                         ready_text=f"round 0 synthesis of seed {seed} not done ({self.round_dir(seed, 0)}/status.json)")
            if "sft" in s.controls:
                d = self.control_dir(seed, "sft")
                globs = tuple(str(r0 / f"{t}-*" / "part-*.arrayrecord") for t in TASKS)
                sft = self.add(Step(f"sft_s{seed}", self.viper + [
                    "sft", "--config", str(s.sft_config), "--workdir", str(d), f"--config.model.path={self.base}",
                    f"--config.data.shard_globs={_tuple(globs)}", f"--config.export.hf_dir={d / 'export.partial'}",
                    f"--config.steps={self.total_steps()}", f"--config.data.batch_size={s.prompts_per_step}",
                    f"--config.sft.images_per_batch={2 * s.prompts_per_step}", f"--config.data.seed={seed}",
                    f"--config.checkpoint.every_steps={max(self.total_steps() // 2, 1)}"],
                    d / "export", partial=d / "export.partial", needs=needs, requires=globs, **ready))
                self._eval(f"sft_s{seed}", d / "export", (sft.name,), "sft", seed, d / "metrics.jsonl", "sft")
            if "stage1" in s.controls:
                self._grpo_control(seed, "stage1", r0, ("caption_refine",), needs, ready)
            if "stage2" in s.controls:
                self._grpo_control(seed, "stage2", r0, ("visual_ops",), needs, ready)
            if "shuffled" in s.controls:
                d = self.control_dir(seed, "shuffled")
                shuffle = self.add(Step(f"shuffle_truth_s{seed}", self.viper + [
                    "world", "shuffle-truth", "--records", str(r0), "--out", str(d / "synth.partial"),
                    "--seed", str(seed)], d / "synth", partial=d / "synth.partial",
                    requires=tuple(str(r0 / f"{t}-*" / "part-*.arrayrecord") for t in TASKS), **ready))
                self._grpo_control(seed, "shuffled", d / "synth", None, needs + (shuffle.name,), {})

    # ------------------------------------------------------------------------------------------ running

    def commands(self) -> list[str]:
        return [shlex.join(st.cmd) for st in self.steps]

    def run(self, say: Callable[[str], None] = print, echo: bool = True) -> dict[str, Any]:
        """Runs every step not done yet, in order; a failed step skips the steps that need it, the rest go on.
        Returns {step name: state}."""
        from viper_jax.loop.processes import run_logged
        from viper_jax.loop.status import StepFailed

        self.w.mkdir(parents=True, exist_ok=True)
        record_path = self.w / "steps.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        states: dict[str, str] = {}
        env = dict(os.environ)
        for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                     # one persistent compilation cache for every run (viper_jax/compile_cache.py): the controls
                     # and later seeds load the loop's compiled programs instead of compiling them again
                     ("VIPER_JAX_CACHE_DIR", str(self.w / "jax_cache"))):
            env.setdefault(k, v)
        for st in self.steps:
            if st.is_done():
                states[st.name] = "done"
                continue
            blocked = [n for n in st.needs if states.get(n) not in ("done", "ran")]
            missing = [g for g in st.requires if not _glob(g)]
            if st.ready is not None and not st.ready():
                missing.append(st.ready_text)
            if blocked or missing:
                states[st.name] = "skipped"
                say(f"[{st.name}] skipped: " + (f"needs {', '.join(blocked)}" if blocked else
                                                f"no input {', '.join(missing)}"))
                continue
            if st.partial is not None:
                _remove(st.partial)
            say(f"[{st.name}] $ {shlex.join(st.cmd)}")
            start = time.time()
            entry = {"command": shlex.join(st.cmd), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            try:
                run_logged(st.cmd, self.w / "logs" / f"{st.name}.log", env, echo=echo, prefix=f"  [{st.name}] ")
                if st.partial is not None:
                    if not st.partial.exists():
                        raise StepFailed(f"{st.name}: the command succeeded but wrote no {st.partial}")
                    st.done.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(st.partial, st.done)
                if st.mark:
                    st.done.parent.mkdir(parents=True, exist_ok=True)
                    st.done.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
                states[st.name] = "ran"
                entry["state"] = "done"
            except StepFailed as e:
                states[st.name] = "failed"
                entry.update(state="failed", error=str(e)[-2000:])
                say(f"[{st.name}] FAILED: {e}")
            except KeyboardInterrupt:
                entry.update(state="interrupted", seconds=round(time.time() - start, 1))
                record[st.name] = entry
                _write(record_path, record)
                raise
            entry["seconds"] = round(time.time() - start, 1)
            say(f"[{st.name}] {entry['state']} in {entry['seconds']:.0f} s")
            record[st.name] = entry
            _write(record_path, record)
        return states

    def run_and_report(self, echo: bool = True) -> tuple[dict[str, str], dict[str, str]]:
        """run(), then the report, written even when a step or an interrupt ends the run early. Returns
        ({step name: state}, the steps neither done nor ran, with their states); prints how long it took."""
        start = time.time()
        states: dict[str, str] = {}
        try:
            states = self.run(echo=echo)
        finally:  # an interrupted run still reports what it has
            self.report(states)
        left = {k: v for k, v in states.items() if v not in ("done", "ran")}
        print(f"steps finished in {time.time() - start:.0f} s; "
              + ("not done: " + ", ".join(f"{k}={v}" for k, v in left.items()) if left else "all done"))
        return states, left

    def report(self, steps: dict[str, Any] | None = None) -> dict[str, Any]:
        from viper_jax.world.report import build_report

        record_path = self.w / "steps.json"
        settings = {**self.s.to_dict(), "workdir": str(self.w), "base_hf": str(self.base),
                    "commands": self.commands(),
                    "steps": json.loads(record_path.read_text()) if record_path.exists() else {},
                    "states": steps or {}}
        return build_report(self.w, self.specs, settings, bench_tsv=self.test_tsv,
                            synth_dir=self.round_dir(self.s.seeds[0], 0) / "synth" if self.s.seeds else None,
                            curve_runs=self.curve_runs)


def _synth_done(round_dir: Path) -> bool:
    """Both synthesis steps of a `viper loop` round are done (its status.json)."""
    try:
        steps = json.loads((round_dir / "status.json").read_text())["steps"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return False
    return all(steps.get(f"synth_{t}", {}).get("state") == "done" for t in TASKS)


def _glob(pattern: str) -> bool:
    import glob

    return bool(glob.glob(pattern))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _write(path: Path, payload: dict[str, Any]) -> None:
    from viper_common.atomic_files import write_json_atomic

    write_json_atomic(path, payload, indent=1, default=str)


def grpo_defaults(path: Path) -> tuple[dict[str, int], int]:
    """(stage steps, rl.prompts_per_step) of a viper train config file (configs/world_grpo.py)."""
    from viper_jax.train.config import load_config

    c = load_config(path)
    return {t: int(c.stages[t].steps) for t in TASKS}, int(c.rl.prompts_per_step)
