"""`viper-synth`: ViPER data synthesis from the command line (also `python -m synthesis_torch`).

    viper-synth caption-refine --images DIR --out OUT [--config FILE] [--config.a.b=value ...]
                               [--shard_index I --num_shards N] [--limit K]
    viper-synth visual-ops     --records STAGE1_OUT [...] --out OUT [same options]
    viper-synth summary OUT [--samples 3] [--json] [--write_manifest]
    viper-synth tiny-models DIR          (tiny random-init models for the CPU demo; see tiny_models.py)
    viper-synth rerender --records OUT --out DIR [--limit 3]   (stage-1 reconstructions again, see rerender.py)

Heavy imports (torch, transformers, diffusers) happen inside the sub-commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder; each job shard writes <task>-<i>-of-<n>/ in it")
    p.add_argument("--config", default=None,
                   help="Python file with get_config() (default: the built-in configs/synth_default.py "
                        "settings); then --config.a.b=value overrides single fields")
    p.add_argument("--shard_index", type=int, default=0, help="this job's shard, in [0, num_shards)")
    p.add_argument("--num_shards", type=int, default=1, help="number of job shards the inputs are split into")
    p.add_argument("--limit", type=int, default=None, help="process at most this many inputs of the shard")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viper-synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from viper_common.cli_errors import DEBUG_HELP

    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    cr = sub.add_parser("caption-refine", help="stage 1: images -> caption_refine records")
    cr.add_argument("--images", required=True, help="folder of .jpg/.jpeg/.png/.webp images (searched recursively)")
    _add_job_args(cr)
    vo = sub.add_parser("visual-ops", help="stage 2: caption_refine records -> visual_ops records")
    vo.add_argument("--records", required=True, nargs="+", help="stage-1 output folder(s) or shard file(s)")
    _add_job_args(vo)
    su = sub.add_parser("summary", help="what a synthesis run produced")
    su.add_argument("dir", help="the --out folder of the synthesis jobs")
    su.add_argument("--samples", type=int, default=3, help="sample records to show per task")
    su.add_argument("--json", action="store_true", help="print JSON instead of text")
    su.add_argument("--write_manifest", action="store_true",
                    help="also write DIR/manifest.json naming every part shard of the run")
    tm = sub.add_parser("tiny-models", help="write tiny random-init VLM / Qwen-Image / Qwen-Image-Edit dirs")
    tm.add_argument("dir")
    rr = sub.add_parser("rerender", help="draw the reconstructions of caption_refine records again (CPU)")
    rr.add_argument("--records", required=True, help="synthesis output folder holding caption_refine-*/ shards")
    rr.add_argument("--out", required=True, help="folder for reconstruction_<i>.png")
    rr.add_argument("--limit", type=int, default=3, help="the first this many records")
    return parser


def _config(args: argparse.Namespace, overrides: list[str]) -> Any:
    from synthesis_torch.config import apply_overrides, load_config

    try:
        config = load_config(args.config)
        rest = apply_overrides(config, overrides)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"viper-synth: {e}") from None
    if rest:
        raise SystemExit(f"viper-synth: unrecognised arguments: {' '.join(rest)}")
    return config


def _print_result(manifest: dict[str, Any], out: str) -> None:
    reasons = ", ".join(f"{k} {v}" for k, v in manifest["rejects_by_reason"].items()) or "none"
    print(f"{manifest['task']} shard {manifest['shard_index']}/{manifest['num_shards']}: "
          f"{manifest['num_records']} records from {manifest['num_inputs']} inputs; rejects: {reasons}. "
          f"Run `viper-synth summary {out}` for details.")


def main(argv: list[str] | None = None) -> int:
    """`viper-synth ARGS`. From the console (argv None): a user's mistake (missing file, bad config key) is
    one line and exit status 1, `--debug` shows its traceback; main(argv) from Python raises."""
    if argv is None:
        from viper_common.cli_errors import run_console

        sys.exit(run_console("viper-synth", main))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, overrides = _parser().parse_known_args(argv)
    if args.command == "caption-refine":
        from synthesis_torch import caption_refine

        manifest = caption_refine.run(_config(args, overrides), args.images, args.out, args.shard_index,
                                      args.num_shards, args.limit)
        _print_result(manifest, args.out)
    elif args.command == "visual-ops":
        from synthesis_torch import visual_ops

        manifest = visual_ops.run(_config(args, overrides), args.records, args.out, args.shard_index,
                                  args.num_shards, args.limit)
        _print_result(manifest, args.out)
    elif args.command == "summary":
        if overrides:
            raise SystemExit(f"viper-synth: unrecognised arguments: {' '.join(overrides)}")
        from synthesis_torch.summary import format_summary, summarize, write_combined_manifest

        summary = summarize(args.dir, args.samples)
        print(json.dumps(summary, indent=1, default=str) if args.json else format_summary(summary))
        if args.write_manifest:
            print(f"wrote {write_combined_manifest(args.dir, summary)}", file=sys.stderr)
    elif args.command == "tiny-models":
        if overrides:
            raise SystemExit(f"viper-synth: unrecognised arguments: {' '.join(overrides)}")
        from synthesis_torch.tiny_models import write_tiny_models

        paths = write_tiny_models(args.dir)
        print(json.dumps(paths, indent=1))
        print("use them with: --config configs/synth_tiny_cpu.py "
              f"(or VIPER_TINY_DIR={args.dir} if not the default /tmp/viper_tiny)", file=sys.stderr)
    elif args.command == "rerender":
        if overrides:
            raise SystemExit(f"viper-synth: unrecognised arguments: {' '.join(overrides)}")
        from synthesis_torch.rerender import rerender

        for path in rerender(args.records, args.out, args.limit):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
