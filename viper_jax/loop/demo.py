"""`viper demo --photos`: one full ViPER round on a CPU, no downloads, no GPU, and a report of what it made.
(`viper demo` without --photos runs in ShapeWorld: world/demo.py.)

    viper demo --photos [--workdir demo_run]

1. Real photographs from installed packages (public domain / CC0 photos that scikit-image ships; the
   CC BY 2.0 photos of scikit-learn as a fallback), square-cropped to 224 px: WORK/images/.
2. `viper loop --config configs/loop_tiny.py` for one round (WORK/loop/): tiny random-init VLM,
   Qwen-Image and Qwen-Image-Edit synthesise caption_refine and visual_ops records; `viper train` runs
   GRPO on them, stage 1 then stage 2, from that same VLM; `viper convert orbax-to-hf` exports the policy.
3. WORK/report.md with assets/: image pairs (original / reconstruction from the caption, original / edited)
   with their truth sentences, the reward curves per stage (assets/rewards.png), the Orbax checkpoint and
   the HF export, each loaded back (JAX for the checkpoint, transformers for the export).

The models are random, so every text is letter soup and the ViPER reward is 0: the demo shows the
machinery end to end, not a better model. Reruns resume (finished steps are skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from viper_jax.loop.processes import command_line
from viper_jax.loop.rounds import TASKS
from viper_jax.train.metrics import read_metrics

SIZE = 224  # side of the square demo inputs (the tiny VLM sees them at 112 x 112, 16 vision tokens)

# (package, file, title, licence). Licences as stated by the packages (skimage/data/_fetchers.py,
# sklearn/datasets/images/README.txt).
PHOTOS = (
    ("skimage", "data/astronaut.png", "Astronaut Eileen Collins (NASA Great Images)",
     "public domain (NASA); scikit-image: 'No known copyright restrictions, released into the public domain'"),
    ("skimage", "data/coffee.png", "A cup of coffee, photo by Rachel Michetti", "CC0 (by the photographer)"),
    ("skimage", "data/chelsea.png", "Chelsea the cat, photo by Stefan van der Walt", "CC0 (by the photographer)"),
    ("skimage", "data/rocket.jpg", "Falcon 9 launch at Cape Canaveral (SpaceX)", "public domain (released by SpaceX)"),
    ("skimage", "data/hubble_deep_field.jpg", "Hubble eXtreme Deep Field (NASA)", "public domain (NASA)"),
    ("sklearn", "datasets/images/china.jpg", "Summer Palace, Beijing, photo by danielbuechele (Flickr 6061409035)",
     "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/), attribution: danielbuechele"),
    ("sklearn", "datasets/images/flower.jpg", "Flower, photo by vultilion (Flickr 6056698931)",
     "CC BY 2.0 (https://creativecommons.org/licenses/by/2.0/); scikit-learn credits danielbuechele / vultilion"),
)


def _package_dir(name: str) -> Path | None:
    """A package's folder without importing it (skimage's import is slow and needs lazy_loader)."""
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def available_photos() -> list[tuple[Path, str, str]]:
    """scikit-image's public-domain / CC0 photos; scikit-learn's CC BY 2.0 ones only when it is missing."""
    for package in ("skimage", "sklearn"):
        root = _package_dir(package)
        out = [(root / rel, title, licence) for pkg, rel, title, licence in PHOTOS
               if pkg == package and root is not None and (root / rel).is_file()]
        if out:
            return out
    return []


def prepare_images(out_dir: Path, count: int) -> list[dict[str, str]]:
    """`count` square crops (the centre of each photo first, then its left/right or top/bottom squares),
    resized to SIZE and saved as PNG. Equal sizes keep the trainer at one compiled shape per stage."""
    from PIL import Image

    photos = available_photos()
    if not photos:
        raise SystemExit("viper demo: no sample photographs found: install scikit-image "
                         "(pip install -e '.[demo]') or scikit-learn")
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for k in range(count):
        path, title, licence = photos[k % len(photos)]
        position = k // len(photos) % 3  # 0 centre, 1 start, 2 end of the long side
        image = Image.open(path).convert("RGB")
        w, h = image.size
        side = min(w, h)
        offset = [(max(w, h) - side) // 2, 0, max(w, h) - side][position]
        box = (offset, 0, offset + side, side) if w >= h else (0, offset, side, offset + side)
        name = f"{k:02d}_{path.stem}_{['centre', 'start', 'end'][position]}.png"
        image.crop(box).resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(out_dir / name)
        made.append({"file": name, "source": str(path), "title": title, "licence": licence,
                     "crop": ["centre", "start", "end"][position]})
    return made


# ------------------------------------------------------------------------------------------------ report

def _pair(left: bytes | Path, right: bytes | Path, out: Path) -> None:
    """Two images side by side at SIZE x SIZE each (small outputs upscaled without smoothing)."""
    import io

    from PIL import Image

    def load(x: bytes | Path) -> Image.Image:
        img = Image.open(io.BytesIO(x) if isinstance(x, bytes) else x).convert("RGB")
        return img.resize((SIZE, SIZE), Image.Resampling.NEAREST if img.width < SIZE else Image.Resampling.LANCZOS)

    canvas = Image.new("RGB", (2 * SIZE + 8, SIZE), "white")
    canvas.paste(load(left), (0, 0))
    canvas.paste(load(right), (SIZE + 8, 0))
    canvas.save(out)


def plot_rewards(metrics: list[dict[str, Any]], out: Path) -> None:
    """reward/mean (+- std) per step, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    stages = list(dict.fromkeys(m.get("stage", "?") for m in metrics))
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(5 * max(len(stages), 1), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [m for m in metrics if m.get("stage", "?") == stage]
        x = [m["step"] for m in rows]
        mean = [m.get("reward/mean", 0.0) for m in rows]
        std = [m.get("reward/std", 0.0) for m in rows]
        ax.plot(x, mean, "o-", label="reward mean")
        ax.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.25,
                        label="+- std within the batch")
        if any("format_rate" in m for m in rows):
            ax.plot(x, [m.get("format_rate", 0.0) for m in rows], "s--", label="format rate")
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("reward")
        ax.set_ylim(-0.05, 1.05)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _load_checks(ckpt: Path, export: Path) -> dict[str, str]:
    """The checkpoint restored by JAX (viper_jax.convert.load_model) and the export by transformers."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices
    out = {}
    try:
        import jax
        from flax import nnx

        from viper_jax import checkpoint
        from viper_jax.convert import load_model

        model = load_model(ckpt)
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        out["checkpoint"] = f"restored with viper_jax.convert.load_model: step {checkpoint.latest_step(ckpt)}, {n:,} parameters"
    except Exception as e:  # the report says what failed instead of dying after minutes of work
        out["checkpoint"] = f"FAILED to restore: {type(e).__name__}: {e}"
    try:
        import transformers
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        transformers.utils.logging.disable_progress_bar()

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(export))
        AutoTokenizer.from_pretrained(str(export))
        out["export"] = (f"loaded with transformers Qwen2_5_VLForConditionalGeneration.from_pretrained (+ its tokenizer): "
                         f"{sum(p.numel() for p in model.parameters()):,} parameters")
    except Exception as e:
        out["export"] = f"FAILED to load: {type(e).__name__}: {e}"
    return out


def write_report(work: Path, images: list[dict[str, str]], started: float | None = None, pairs: int = 3,
                 rerender: bool = True, echo: Any = print, synth_command: str = "") -> Path:
    """WORK/report.md + WORK/assets/ for the round in WORK/loop/round_000. synth_command: the loop's
    `synth.command` ("" = `python -m synthesis_torch` of this interpreter)."""
    from viper_common import records

    rd = work / "loop" / "round_000"
    status = json.loads((rd / "status.json").read_text())
    assets = work / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    csr, vop = (records.first_records(rd / "synth", task, pairs) for task in ("caption_refine", "visual_ops"))
    if rerender and csr:  # the torch side draws them, in its own process (as the loop runs synthesis)
        subprocess.run(command_line(synth_command, "synthesis_torch") + [
            "rerender", "--records", str(rd / "synth"), "--out", str(assets), "--limit", str(len(csr))],
            check=True, capture_output=True)
    metrics = read_metrics(rd / "train" / "metrics.jsonl")
    plot_rewards(metrics, assets / "rewards.png")
    steps = status["steps"]
    ckpt, export = Path(steps["train"]["checkpoints"]), Path(steps["export"]["hf_dir"])
    echo("loading the checkpoint (JAX) and the export (transformers) back ...")
    checks = _load_checks(ckpt, export)

    md = ["# ViPER demo: one round of the self-evolution loop with tiny random-init models", ""]
    if started is not None:
        md.append(f"Wall time {time.time() - started:.0f} s on this machine (no GPU, no downloads), "
                  f"this invocation (steps finished by an earlier one are skipped).")
    stages = json.loads((rd / "train" / "config.json").read_text())["stages"]
    rewards = sorted({stage["reward"] for stage in stages.values()})
    if rewards == ["caption_refine", "visual_ops"]:  # each stage's own: the ViPER reward
        about_reward = ("The tiny policy cannot write the `<think>/<answer>` format and never matches a truth "
                        "sentence, so the ViPER reward is 0 and GRPO has no signal: the round shows the pipeline end "
                        "to end, not learning (`viper demo --reward toy_letters` shows GRPO moving a toy reward).")
    else:
        about_reward = ("Rewards: " + ", ".join(f"{k}: `{v['reward']}`" for k, v in stages.items()) + " instead of "
                        "the ViPER reward (which a random tiny policy cannot earn); the curves show GRPO at work, "
                        "not better perception.")
    md += ["", "Every model here is random-init (a 0.2 M-parameter Qwen2.5-VL and diffusers' tiny Qwen-Image / "
           "Qwen-Image-Edit), so captions, corrections and edit instructions are letter soup and the "
           "reconstructions/edits are noise. " + about_reward + " With the real models: "
           "`viper loop --config configs/loop_7b.py`.", "", "## Steps", "", "| step | seconds | what it made |",
           "|---|---|---|"]
    for name, step in steps.items():
        made = {"synth_caption_refine": lambda s: f"{s.get('num_records')} caption_refine records, {s.get('num_rejects')} rejects",
                "synth_visual_ops": lambda s: f"{s.get('num_records')} visual_ops records, {s.get('num_rejects')} rejects",
                "train": lambda s: f"{s.get('steps')} GRPO steps, checkpoints in `{s.get('checkpoints')}`",
                "export": lambda s: f"HF directory `{s.get('hf_dir')}`"}[name](step)
        md.append(f"| {name} | {step.get('seconds')} | {made} |")
    md += ["", f"Round directory: `{rd}` (`status.json` per step, `logs/` per subprocess).", "",
           "## Inputs", "", "| file | photograph | licence |", "|---|---|---|"]
    md += [f"| {m['file']} | {m['title']} ({m['crop']} crop) | {m['licence']} |" for m in images]
    md += ["", "## Stage 1 data: caption self-refining (original / reconstruction from the caption alone)", ""]
    for i, r in enumerate(csr):
        recon = assets / f"reconstruction_{i}.png"
        if recon.exists():
            _pair(r.images[0], recon, assets / f"csr_{i}.png")
            md.append(f"![{r.id}](assets/csr_{i}.png)")
        md += ["", f"`{r.id}` from `{r.provenance.get('source_rel')}`", "", f"- caption C_g: `{r.caption}`",
               *[f"- truth (correction): `{t}`" for t in r.truth], ""]
    md += ["(Reconstructions are re-rendered for this report with each record's caption, seed and settings; the "
           "synthesis job does not store them.)", "", "## Stage 2 data: visual operations (original / edited)", ""]
    for i, r in enumerate(vop):
        _pair(r.images[0], r.images[1], assets / f"vop_{i}.png")
        md += [f"![{r.id}](assets/vop_{i}.png)", "", f"`{r.id}`, changed fraction "
               f"{r.provenance.get('changed_fraction')}", "", *[f"- truth (operation): `{t}`" for t in r.truth], ""]
    md += ["## Training: reward per stage", "", "![rewards](assets/rewards.png)", "",
           "| step | stage | reward mean | reward std | format rate | response tokens | step seconds |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {m['step']} | {m.get('stage')} | {m.get('reward/mean', 0):.3f} | {m.get('reward/std', 0):.3f} | "
           f"{m.get('format_rate', 0):.2f} | {m.get('response_length/mean', 0):.0f} | {m.get('time/step_s', 0):.1f} |"
           for m in metrics]
    md += ["", "## Checkpoint and export", "", f"- Orbax checkpoint: `{ckpt}`: {checks['checkpoint']}",
           f"- HF export (next round's synthesiser): `{export}`: {checks['export']}", "",
           "Use them: `viper generate --model " + str(export) + f" --image {work / 'images' / images[0]['file']} "
           "--prompt \"Describe the image.\"`, `viper eval --model " + str(export) + " --tsv BENCH.tsv`, or go on "
           "with round 1, synthesised by this export: `viper loop --config configs/loop_tiny.py --workdir "
           f"{work / 'loop'} --images {work / 'images'} --rounds 2`.", ""]
    report = work / "report.md"
    report.write_text("\n".join(md))
    return report


# ------------------------------------------------------------------------------------------------ CLI

def _repo_config(name: str) -> Path:
    path = Path(__file__).resolve().parents[2] / "configs" / name
    if not path.is_file():
        raise SystemExit(f"viper demo: {path} not found: run the demo from a clone of the repository "
                         "(pip install -e '.[demo]')")
    return path


def _check_installed() -> None:
    missing = [m for m in ("jax", "torch", "diffusers", "transformers", "matplotlib", "synthesis_torch")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"viper demo: missing {', '.join(missing)}: pip install -e '.[demo]'")


def add_demo_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="one ViPER round in ShapeWorld on CPU, measured before / after (--photos: tiny "
                                    "random models on real photographs)")
    p.add_argument("--workdir", default="demo_run", help="where everything goes (default ./demo_run)")
    p.add_argument("--photos", action="store_true", help="the photograph demo with tiny random-init models "
                                                         "(the machinery end to end; its reward stays 0)")
    p.add_argument("--base_hf", default=None, help="ShapeWorld: the base VLM (default: the shipped "
                                                   "assets/world_base, else one built by `viper world base`)")
    p.add_argument("--num_images", type=int, default=None, help="source images (ShapeWorld default 24; "
                                                                "--photos: crops of the sample photographs, 6)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per stage (default 3)")
    p.add_argument("--reward", default="", help="--photos: reward of both stages (default: the ViPER reward; "
                                                "toy_letters gives a reward a random tiny model can learn)")
    p.add_argument("--quiet", action="store_true", help="do not echo the steps' output")


def run_demo_cli(args: argparse.Namespace) -> None:
    from viper_jax.loop.cli import run_interruptible
    from viper_jax.loop.config import load_config
    from viper_jax.loop.rounds import Loop
    from viper_jax.train.config import override_flags

    _check_installed()
    if not args.photos:
        from viper_jax.world.demo import run_world_demo

        raise SystemExit(run_world_demo(args))
    if args.base_hf:
        raise SystemExit("viper demo: --base_hf is for the ShapeWorld demo, not --photos")
    args.num_images, args.steps = args.num_images or 6, args.steps or 3
    start = time.time()
    work = Path(args.workdir).absolute()
    images = prepare_images(work / "images", args.num_images)
    (work / "images.json").write_text(json.dumps(images, indent=1))
    config = load_config(_repo_config("loop_tiny.py"))
    config.workdir, config.images, config.rounds, config.echo = str(work / "loop"), str(work / "images"), 1, not args.quiet
    values = {f"stages.{task}.steps": args.steps for task in TASKS}
    values.update({f"stages.{task}.reward": args.reward for task in TASKS if args.reward})
    config.train.overrides = tuple(config.train.overrides) + tuple(override_flags(values))
    print(f"viper demo: {len(images)} images in {work / 'images'}; one round in {work / 'loop'}")
    run_interruptible(Loop(config).run, "viper demo")
    report = write_report(work, images, started=start, synth_command=config.synth.command)
    print(f"viper demo: done in {time.time() - start:.0f} s; report: {report}")
