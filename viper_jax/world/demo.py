"""`viper demo` in ShapeWorld (its default): one ViPER round on a base VLM that perceives a little, measured on
held-out questions.

    viper demo [--workdir demo_run] [--base_hf DIR] [--num_images 24] [--steps 3]

The base: --base_hf, else the one the repository ships (SHIPPED_BASE = assets/world_base, made by `viper world
base` with the fixed seeds of configs/world_base.py; its README.md gives the command), else one built here by
`viper world base` (about 25 minutes on 2 cores). Then the quick reproduce's plan (world/reproduce.py) without
its controls: a benchmark of 40 test + 20 val questions per category, the round's unlabelled source images,
`viper loop` (the base synthesises both stages' records itself, the diffusion models simulated; GRPO stage 1
then stage 2; export), `viper eval` of the base and of the round, and WORK/report.md with the before / after
table, the reward and format-rate curves per stage and examples. Reruns resume (finished steps are skipped).
`viper demo --photos` is the earlier demo: tiny random-init models on real photographs (loop/demo.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from viper_jax.world.reproduce import REPO, TASKS, Plan, Settings, grpo_defaults, quick_settings

SHIPPED_BASE = REPO / "assets" / "world_base"


def demo_settings(work: Path, base_hf: str | None, images: int | None, steps: int | None) -> Settings:
    """The quick reproduce's settings, no controls, the base chosen as the module docstring says."""
    s = quick_settings(work)
    s.controls = ()
    _, s.prompts_per_step = grpo_defaults(s.grpo_config)
    if images is not None:
        s.images = images
    if steps is not None:
        s.steps = {task: steps for task in TASKS}
    if base_hf:
        s.base_hf = Path(base_hf)
    elif (SHIPPED_BASE / "config.json").is_file():
        s.base_hf = SHIPPED_BASE
    s.base_workdir = work / "base"
    return s


def run_world_demo(args: argparse.Namespace) -> int:
    start = time.time()
    for name, value in (("--num_images", args.num_images), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise SystemExit(f"viper demo: {name} must be >= 1, got {value}")
    if args.base_hf and not (Path(args.base_hf) / "config.json").is_file():
        raise SystemExit(f"viper demo: --base_hf {args.base_hf} is not an HF model directory (no config.json)")
    plan = Plan(demo_settings(Path(args.workdir).absolute(), args.base_hf, args.num_images, args.steps))
    if plan.s.base_hf is None:
        print(f"viper demo: no base given or shipped; building one in {plan.base_dir} (about 25 minutes)")
    else:
        print(f"viper demo: base {plan.base}")
    _, left = plan.run_and_report(echo=not args.quiet)
    print(f"viper demo: {'finished' if not left else 'not finished'} in {time.time() - start:.0f} s; "
          f"report: {plan.w / 'report.md'}")
    return 1 if left else 0
