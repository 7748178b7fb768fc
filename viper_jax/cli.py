"""`viper`: the JAX side's command line. Each sub-command lives in its own module, imported only when
it runs, so `viper --help` is instant and a sub-command's heavy imports stay its own."""

from __future__ import annotations

import argparse
import sys


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from viper_jax.dtypes import DTYPE_NAMES  # light

    convert = sub.add_parser("convert", help="convert weights between HF safetensors and Orbax")
    which = convert.add_subparsers(dest="direction", required=True)
    to_orbax = which.add_parser("hf-to-orbax", help="HF Qwen2.5-VL directory -> Orbax checkpoint")
    to_orbax.add_argument("--hf_dir", required=True, help="directory with config.json and *.safetensors")
    to_orbax.add_argument("--out", required=True, help="Orbax checkpoint directory to create")
    to_orbax.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                          help="parameter dtype stored in the checkpoint")
    to_orbax.add_argument("--step", type=int, default=0)
    to_hf = which.add_parser("orbax-to-hf", help="Orbax checkpoint (converted or trained) -> HF directory")
    to_hf.add_argument("--ckpt", required=True, help="Orbax checkpoint directory")
    to_hf.add_argument("--out", required=True, help="HF directory to write")
    to_hf.add_argument("--tokenizer_dir", default=None,
                       help="copy tokenizer/processor files from here so the export is usable as-is")
    to_hf.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    to_hf.add_argument("--max_shard_gb", type=float, default=5.0)


def _run_convert(args: argparse.Namespace) -> None:
    from viper_jax import convert

    if args.direction == "hf-to-orbax":
        path = convert.hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, step=args.step)
    else:
        path = convert.orbax_to_hf(args.ckpt, args.out, tokenizer_dir=args.tokenizer_dir, step=args.step,
                                   max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {path}")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from viper_jax.inference import add_generate_args  # light: jax/transformers load only when run

    add_generate_args(sub)


def _run_generate(args: argparse.Namespace) -> None:
    from viper_jax import compile_cache
    from viper_jax.inference import run_generate

    compile_cache.enable()  # $VIPER_JAX_CACHE_DIR or ~/.cache/viper_jax/jax_cache ("off": none)
    run_generate(args)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from viper_jax.evaluation.run import add_eval_args

    add_eval_args(sub)


def _run_eval(args: argparse.Namespace) -> None:
    from viper_jax import compile_cache
    from viper_jax.evaluation.run import run_eval

    compile_cache.enable()  # $VIPER_JAX_CACHE_DIR or ~/.cache/viper_jax/jax_cache ("off": none)
    run_eval(args)


def _add_config_command(sub: argparse._SubParsersAction, name: str, help: str, example: str) -> None:
    """A sub-command run from a config file, with --workdir and --config.a.b=value overrides."""
    cmd = sub.add_parser(name, help=help, description="Extra arguments --config.a.b=value override single config fields.")
    cmd.add_argument("--config", required=True, help=f"Python config file with get_config() (see {example})")
    cmd.add_argument("--workdir", default=None, help="checkpoints, metrics and logs (= --config.workdir)")
    cmd.set_defaults(accepts_config_overrides=True)


def _add_train(sub: argparse._SubParsersAction) -> None:
    _add_config_command(sub, "train", "phased GRPO training (caption_refine, then visual_ops)", "configs/")


def _run_train(args: argparse.Namespace) -> None:
    from viper_jax.peer_loss import supervised_train

    if supervised_train(args.config, args.workdir, args.overrides):  # several processes: the child trained
        return
    from viper_jax.train.trainer import run_cli

    run_cli(args.config, args.workdir, args.overrides)


def _add_sft(sub: argparse._SubParsersAction) -> None:
    _add_config_command(sub, "sft", "supervised fine-tuning (answer-token loss) on ViPER or instruct records",
                        "configs/sft_tiny.py")


def _run_sft(args: argparse.Namespace) -> None:
    from viper_jax.sft.trainer import run_cli

    run_cli(args.config, args.workdir, args.overrides)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from viper_jax.plan.cli import add_plan_args

    add_plan_args(sub)


def _run_plan(args: argparse.Namespace) -> None:
    from viper_jax.plan.cli import run_plan

    run_plan(args)


def _add_loop(sub: argparse._SubParsersAction) -> None:
    from viper_jax.loop.cli import add_loop_args  # light: the steps run as subprocesses

    add_loop_args(sub)


def _run_loop(args: argparse.Namespace) -> None:
    from viper_jax.loop.cli import run_loop_cli

    run_loop_cli(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from viper_jax.loop.demo import add_demo_args

    add_demo_args(sub)


def _run_demo(args: argparse.Namespace) -> None:
    from viper_jax.loop.demo import run_demo_cli

    run_demo_cli(args)


def _add_world(sub: argparse._SubParsersAction) -> None:
    from viper_jax.world.cli import add_world_args  # light: the world loads when an action runs

    add_world_args(sub)


def _run_world(args: argparse.Namespace) -> None:
    from viper_jax.world.cli import run_world

    run_world(args)


COMMANDS = {"convert": (_add_convert, _run_convert), "generate": (_add_generate, _run_generate),
            "eval": (_add_eval, _run_eval), "train": (_add_train, _run_train),
            "plan": (_add_plan, _run_plan)}
COMMANDS.update(loop=(_add_loop, _run_loop), demo=(_add_demo, _run_demo), sft=(_add_sft, _run_sft))
COMMANDS.update(world=(_add_world, _run_world))


def main(argv: list[str] | None = None) -> None:
    """`viper ARGS`. From the console (argv None): a user's mistake (missing file, bad config key, unreadable
    checkpoint) is one line and exit status 1, `--debug` shows its traceback; main(argv) from Python raises."""
    if argv is None:
        from viper_common.cli_errors import run_console

        sys.exit(run_console("viper", main))
    parser = argparse.ArgumentParser(prog="viper", description=__doc__)
    from viper_common.cli_errors import DEBUG_HELP

    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_config_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
