"""`viper plan` arguments (no heavy imports, so `viper --help` stays instant); the work is in programs.py."""

from __future__ import annotations

import sys
from typing import Any


def add_plan_args(sub: Any) -> None:
    p = sub.add_parser("plan", help="AOT-compile the GRPO step for a TPU topology: per-chip memory, FLOPs, time",
                       description="Compiles the update and rollout of a training config for a TPU slice that "
                                   "need not be present (needs libtpu) and reports whether it fits. Extra "
                                   "arguments --config.a.b=value override config fields (e.g. --config.mesh.tensor=2).")
    p.add_argument("--config", required=True, help="training config file (configs/*.py)")
    p.add_argument("--topology", required=True, help="e.g. v5e:4x4 (v5e-16), v5p:4x4x4 (v5p-128), v6e:4x4 (v6e-16)")
    p.add_argument("--model_config", default=None, help="config.json (or HF dir) of the model, if model.path has none")
    p.add_argument("--programs", default="update,rollout", help="comma-separated: update (= micro,apply), rollout (= prefill,decode), or single ones")
    p.add_argument("--prompt_len", type=int, default=None, help="prompt bucket (default: largest data.length_buckets)")
    p.add_argument("--response_len", type=int, default=None, help="default: rollout.max_new_tokens")
    p.add_argument("--images_per_prompt", type=int, default=None, help="default 2 (visual_ops)")
    p.add_argument("--image_tokens", type=int, default=None, help="merged tokens per image (default from max_pixels)")
    p.add_argument("--rollout_prompts", type=int, default=None, help="default: rl.prompts_per_step")
    p.add_argument("--lengths", default="full", choices=("full", "realistic"),
                   help="prompt/response lengths rl.packing packs (viper_jax/plan/packed.py): full (every row at its "
                        "bucket and max_new_tokens) or realistic (varied prompts, long-tailed responses)")
    p.add_argument("--seed", type=int, default=0, help="seed of the realistic lengths")
    p.set_defaults(accepts_config_overrides=True)


def run_plan(args: Any) -> None:
    from viper_jax.plan.chips import PlanError  # first: sets libtpu's environment
    from viper_jax.plan.programs import plan
    from viper_jax.plan.report import format_report
    from viper_jax.plan.workload import model_config_for
    from viper_jax.train.config import REMATS, ConfigError, apply_overrides, load_config

    try:
        config = load_config(args.config)
        apply_overrides(config, getattr(args, "overrides", []))
        if config.model.remat not in REMATS:  # the one check of validate() a plan needs (no workdir, no data)
            raise ConfigError(f"config model.remat: must be one of {REMATS}")
        report = plan(config, args.topology, model_config=model_config_for(config, args.model_config),
                      programs=[x.strip() for x in args.programs.split(",") if x.strip()], verbose=True,
                      prompt_len=args.prompt_len, response_len=args.response_len,
                      images_per_prompt=args.images_per_prompt, image_tokens=args.image_tokens,
                      rollout_prompts=args.rollout_prompts, lengths=args.lengths, seed=args.seed)
    except (PlanError, ConfigError) as e:
        print(f"viper plan: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(format_report(report))
    if not report.fits:
        print(f"viper plan: {args.config} does not fit {args.topology}: " + "; ".join(report.problems())
              + ". Try a larger fsdp axis or slice, model.remat=full, a smaller rl.micro_batch_prompts or "
                "rl.prompts_per_step, rl.logit_chunk.", file=sys.stderr)
        raise SystemExit(1)
