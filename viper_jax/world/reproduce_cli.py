"""scripts/reproduce.py's command line: flags -> `Settings`, then the `Plan` run (or printed, or only reported).
The experiment itself, its steps and their outputs: reproduce.py."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from viper_jax.world import reproduce
from viper_jax.world.reproduce import CONTROLS, Plan, Settings, grpo_defaults, quick_settings


def parse_args(argv: Sequence[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(prog="scripts/reproduce.py", description=reproduce.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="default runs/reproduce (runs/reproduce_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 round, 24 images, 3 + 3 steps, no SFT control, "
                                                        "a smaller benchmark (40 test + 20 val per category)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick 0)")
    p.add_argument("--rounds", type=int, default=None, help="ViPER rounds (default 2; quick 1)")
    p.add_argument("--images", type=int, default=None, help="source images per round (default 64; quick 24)")
    p.add_argument("--steps", default=None, help="GRPO steps per stage as CAPTION,OPS (default: the GRPO config's; "
                                                 "quick 3,3)")
    p.add_argument("--controls", default=None, help=f"comma-separated subset of {','.join(CONTROLS)} (default all; "
                                                    "quick without sft); 'none' for none")
    p.add_argument("--single_stage_steps", choices=("total", "own"), default="total",
                   help="steps of the stage-1-only / stage-2-only controls: both stages' (default) or the stage's own")
    p.add_argument("--train_override", action="append", default=[], metavar="KEY=VALUE",
                   help="a viper train setting for ViPER's rounds and every GRPO control alike, e.g. "
                        "reward.matcher=shapeworld (repeatable)")
    p.add_argument("--base_hf", default=None, help="use this base HF directory instead of building one")
    p.add_argument("--base_workdir", default=None, help="where `viper world base` builds the base (default "
                                                        "WORKDIR/base; with --quick runs/reproduce/base, the full "
                                                        "run's, so that both share one base)")
    p.add_argument("--dry_run", action="store_true", help="print the commands (and whether each is done); run nothing")
    p.add_argument("--report_only", action="store_true", help="only (re)write results.json and report.md")
    p.add_argument("--quiet", action="store_true", help="do not echo the steps' output (always in WORKDIR/logs)")
    return p.parse_args(argv)


def settings_from_args(args) -> Settings:
    workdir = Path(args.workdir or ("runs/reproduce_quick" if args.quick else "runs/reproduce"))
    s = quick_settings(workdir) if args.quick else Settings(workdir=workdir)
    if not args.quick:
        s.steps, s.prompts_per_step = grpo_defaults(s.grpo_config)
    else:
        _, s.prompts_per_step = grpo_defaults(s.grpo_config)
    if args.seeds:
        s.seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit("--rounds must be >= 1")
        s.rounds = args.rounds
    if args.images is not None:
        s.images = args.images
    if args.steps:
        try:
            a, b = (int(x) for x in args.steps.split(","))
        except ValueError:
            raise SystemExit(f"--steps must be CAPTION,OPS (two integers), got {args.steps!r}") from None
        if min(a, b) < 1:
            raise SystemExit("--steps: each stage needs >= 1 step")
        s.steps, s.step_overrides = {"caption_refine": a, "visual_ops": b}, True
    if args.controls:
        chosen = () if args.controls == "none" else tuple(x.strip() for x in args.controls.split(",") if x.strip())
        bad = [c for c in chosen if c not in CONTROLS]
        if bad:
            raise SystemExit(f"--controls: unknown {bad}; known: {CONTROLS}")
        s.controls = chosen
    s.single_stage_steps = args.single_stage_steps
    for item in args.train_override:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--train_override must be KEY=VALUE (a viper train config key), got {item!r}")
        s.train_overrides += (f"--config.{key.strip()}={value}",)
    if args.base_hf:
        s.base_hf = Path(args.base_hf)
    if args.base_workdir:
        s.base_workdir = Path(args.base_workdir)
    elif args.quick:
        s.base_workdir = Path("runs/reproduce/base")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(settings_from_args(args))
    if args.dry_run:
        for st in plan.steps:
            print(f"# {st.name} [{'done' if st.is_done() else 'to do'}]\n{shlex.join(st.cmd)}")
        return 0
    states: dict[str, str] = {}
    if not args.report_only:
        if plan.s.base_hf is not None and not plan.base.exists():
            raise SystemExit(f"--base_hf {plan.base} does not exist")
        states, _ = plan.run_and_report(echo=not args.quiet)
    else:
        plan.report()
    print(f"wrote {plan.w / 'results.json'} and {plan.w / 'report.md'}")
    return 1 if any(v in ("failed", "skipped") for v in states.values()) else 0
