"""`viper loop` arguments and its run (SIGTERM handled like Ctrl-C: the running step stops, a rerun resumes)."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from viper_jax.loop.status import StepFailed

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
    from viper_jax.loop.config import load_config
    from viper_jax.loop.rounds import Loop

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
