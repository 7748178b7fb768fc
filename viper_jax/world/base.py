"""`viper world base`: the ShapeWorld base model, from random init, in one resumable command.

What Qwen2.5-VL-Instruct is before ViPER, in miniature: a tiny Qwen2.5-VL trained with `viper sft` on the
world's general skills (describe an image, answer coarse questions, compare two images coarsely, the answer
format; viper_common/shapeworld/base_data.py), never on the benchmark's questions nor on ViPER's two tasks.

    viper world base --workdir DIR [--config configs/world_base.py] [--config.sft.steps=N ...]

Steps, each skipped when its output is already complete (so a killed run resumes where it stopped; the SFT
itself resumes from its last checkpoint):
  1. DIR/data/base_data   the SFT records (seeds from the base_train range; written in `world.workers` processes)
     DIR/data/tokenizer   a byte-level BPE tokenizer trained on the world's text, Qwen2 specials and template
  2. DIR/init_model       the random-init model (architecture from `config.model`) as an HF directory, its
                          vision tower pretrained on the world's coarse content (world/vision_pretrain.py),
                          with the processor configs of the world's image size (exported with the model, so
                          transformers' AutoProcessor loads base_hf with 16 visual tokens per image)
  3. DIR/sft              `viper sft` (checkpoints, metrics.jsonl); its export is DIR/base_hf
  4. DIR/base.json        what was built, with the wall time of each step and the SFT's tokens/s
DIR/base_hf is an ordinary HF directory: `viper-synth` (transformers), `viper train` and `viper eval` load it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from viper_common.atomic_files import write_json_atomic
from viper_common import config_overrides
from viper_common.config_overrides import ConfigError
from viper_common.shapeworld.base_data import DEFAULT_WEIGHTS
from viper_jax.sft import config as sft_config

logger = logging.getLogger(__name__)
SPECIAL_IDS = ("<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def base_config() -> ConfigDict:
    """The schema of `viper world base` with its defaults (configs/world_base.py is the file to edit)."""
    c = ConfigDict()
    c.workdir = ""
    c.world = ConfigDict()
    c.world.n_train = 24000  # SFT examples (the data repeats with a new shuffle per epoch)
    c.world.size = 112  # image side: 8x8 patches of 14 px -> 16 visual tokens after the 2x2 merge
    c.world.vocab_size = 1024
    c.world.tokenizer_scenes = 2000
    c.world.workers = 2  # processes writing the data
    c.world.one_object_share = 0.0  # share of one-object scenes in the base data (base_data.example)
    c.world.weights = ConfigDict(dict(DEFAULT_WEIGHTS))  # the kinds of example, relative (base_data.KINDS)
    c.world.compare_lists = False  # compare examples may ask for the differences as "- " lines (base_data.compare)
    c.world.mcq_answer = "letter"  # multiple-choice answers: the option letter, or "text" (base_data.choose)
    c.world.compare_modes = ()  # the compare questions (base_data.COMPARE_MODES); () = that mix, + "list" above
    c.model = ConfigDict()  # the tiny Qwen2.5-VL's architecture
    c.model.hidden = 128
    c.model.layers = 4
    c.model.heads = 4
    c.model.kv_heads = 2
    c.model.intermediate = 384
    c.model.vision_hidden = 96
    c.model.vision_depth = 3
    c.model.vision_heads = 4
    # The decoder's rotary base, Qwen2.5-VL's. At head size 32 it leaves MRoPE's height and width sections (the
    # lowest frequencies) under 0.006 rad per grid step; 10 (0.1-0.4 rad) made the base stop reading its images
    # at all (base13, docs/shapeworld.md "The base does not compare two images at all").
    c.model.rope_theta = 1e6
    c.model.seed = 0
    # Vision pretraining (world/vision_pretrain.py): without it the base never reads its images (measured).
    c.vision = ConfigDict()
    c.vision.steps = 300  # 0 = keep the random tower
    c.vision.batch_size = 32
    c.vision.learning_rate = 1e-3
    c.vision.pool_scenes = 0  # > 0: scenes rendered once (in world.workers processes) and reused, mirrored; 0: fresh
    c.sft = sft_config.base_config()  # workdir, model.path and data.shard_globs are set by `build_base`
    return c


# sft.data.prompts (task -> template) is free-form, as in `viper sft`'s own config.
OPEN_SECTIONS = {"sft.data.prompts": None}


def check_keys(config: ConfigDict) -> None:
    """Every key of `config` must exist in base_config()."""
    config_overrides.check_keys(config, base_config(), OPEN_SECTIONS)


def load_config(path: str | Path) -> ConfigDict:
    """`get_config()` of a Python file, checked against this schema (unknown keys refused)."""
    return config_overrides.load_config_file(path, base_config(), OPEN_SECTIONS)


def validate(config: ConfigDict) -> None:
    """What would fail after minutes of data generation is refused first, naming the key."""
    check_keys(config)
    if not config.workdir:
        raise ConfigError("config workdir: is required (--workdir)")
    m = config.model
    if min(m.hidden, m.layers, m.heads, m.kv_heads, m.intermediate, m.vision_hidden, m.vision_depth,
           m.vision_heads) < 1:
        raise ConfigError(f"config model: every size must be positive, got {m.to_dict()}")
    if m.hidden % m.heads or (m.hidden // m.heads) % 2 or m.hidden // m.heads < 6 or m.heads % m.kv_heads:
        raise ConfigError(f"config model: hidden {m.hidden} must split into {m.heads} heads of an even size >= 6 "
                          f"(MRoPE's three sections), and heads into kv_heads {m.kv_heads} groups")
    if not m.rope_theta > 1:
        raise ConfigError(f"config model.rope_theta: {m.rope_theta} must be > 1")
    if m.vision_hidden % m.vision_heads:
        raise ConfigError(f"config model: vision_hidden {m.vision_hidden} must split into {m.vision_heads} heads")
    if config.world.size % 28:
        raise ConfigError(f"config world.size: {config.world.size} px is not a multiple of 28 (14 px patches, 2x2 merge)")
    if config.vision.steps < 0 or config.vision.pool_scenes < 0:
        raise ConfigError(f"config vision: steps {config.vision.steps} and pool_scenes {config.vision.pool_scenes} "
                          "must be >= 0")
    if not 0 <= config.sft.sft.focus_steps <= config.sft.steps:  # viper sft refuses it too, but only after the data
        raise ConfigError(f"config sft.sft.focus_steps: {config.sft.sft.focus_steps} must be in [0, sft.steps="
                          f"{config.sft.steps}]")


def model_config(tokenizer: Any, m: ConfigDict) -> Any:
    """The Qwen2.5-VL config of the architecture `m`, its special-token ids the tokenizer's own."""
    from viper_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, TextConfig, VisionConfig

    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_IDS}
    half = m.hidden // m.heads // 2
    third = half // 3
    text = TextConfig(vocab_size=len(tokenizer), hidden_size=m.hidden, intermediate_size=m.intermediate,
                      num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, mrope_section=(half - 2 * third, third, third),
                      rope_theta=float(m.rope_theta),
                      bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=int(tokenizer.pad_token_id))
    vision = VisionConfig(depth=m.vision_depth, hidden_size=m.vision_hidden, intermediate_size=2 * m.vision_hidden,
                          num_heads=m.vision_heads, out_hidden_size=m.hidden,
                          fullatt_block_indexes=(m.vision_depth - 1,), tokens_per_second=2)
    return Qwen2_5_VLConfig(text=text, vision=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def sft_settings(config: ConfigDict, workdir: Path) -> ConfigDict:
    """`config.sft` with the paths this command owns filled in."""
    sft = ConfigDict(config.sft.to_dict())
    sft.workdir = str(workdir / "sft")
    sft.model.path = str(workdir / "init_model")
    sft.model.tiny_init = False
    sft.data.shard_globs = (str(workdir / "data" / "base_data" / "*.arrayrecord"),)
    pixels = int(config.world.size) ** 2  # every image at exactly the world's size: one vision program
    sft.data.min_pixels = sft.data.max_pixels = pixels
    sft.export.hf_dir = str(workdir / "base_hf")
    return sft


def _timed(seconds: dict[str, float], name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[name] = round(time.perf_counter() - start, 1)
    return out


def _write_data(config: ConfigDict, data_dir: Path) -> None:
    from viper_common.shapeworld import base_data

    w = config.world
    try:
        base_data.write_base_data(data_dir / "base_data", int(w.n_train), size=int(w.size), workers=int(w.workers),
                                  one_object_share=float(w.one_object_share),
                                  weights={k: float(v) for k, v in w.weights.items()},
                                  compare_lists=bool(w.compare_lists), mcq_answer=str(w.mcq_answer),
                                  compare_modes=tuple(w.compare_modes) or None)
    except ValueError as e:  # settings that contradict the data already in the folder, or bad counts
        raise ConfigError(f"config world: {e}") from None


def _write_tokenizer(config: ConfigDict, tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from viper_jax.world import tokenizer as world_tokenizer

    if not tok_dir.exists():
        tmp = tok_dir.with_name(tok_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        world_tokenizer.build_world_tokenizer(tmp, world_tokenizer.world_texts(int(config.world.tokenizer_scenes)),
                                              int(config.world.vocab_size))
        tmp.rename(tok_dir)  # as the model below: a kill mid-save leaves only the .tmp folder
    return AutoTokenizer.from_pretrained(str(tok_dir))


def _write_init_model(config: ConfigDict, tokenizer: Any, model_dir: Path) -> dict[str, Any]:
    """The random-init model with its vision tower pretrained; returns the pretraining's summary."""
    from viper_jax.tiny import write_random_model
    from viper_jax.world.vision_pretrain import pretrain_vision

    summary_path = model_dir / "vision_pretrain.json"
    if (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")):
        return json.loads(summary_path.read_text()) if summary_path.exists() else {}
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
    write_random_model(tmp, model_config(tokenizer, config.model), tokenizer, seed=int(config.model.seed))
    v = config.vision
    summary = {"steps": 0}
    if int(v.steps) > 0:
        summary = pretrain_vision(tmp, steps=int(v.steps), batch_size=int(v.batch_size),
                                  learning_rate=float(v.learning_rate), size=int(config.world.size),
                                  seed=int(config.model.seed), pool_scenes=int(v.pool_scenes),
                                  workers=int(config.world.workers))
    write_json_atomic(tmp / "vision_pretrain.json", summary)
    tmp.rename(model_dir)  # a half-written model directory is never mistaken for a finished one
    return summary


def write_processor_configs(model_dir: Path, tokenizer: Any, size: int) -> None:
    """processor_config.json (transformers v5's one file for the image and video processors) for images of
    exactly size x size px, unless present. Written in a temporary folder and moved in: a kill leaves no
    half-written JSON."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if (model_dir / "processor_config.json").exists():
        return
    tmp = model_dir.with_name(model_dir.name + ".processor.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pixels = size * size
    image = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    video = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels)
    Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                        chat_template=tokenizer.chat_template).save_pretrained(str(tmp))
    (tmp / "processor_config.json").replace(model_dir / "processor_config.json")
    shutil.rmtree(tmp)


def _sft_summary(metrics_path: Path) -> dict[str, Any]:
    from viper_jax.train.metrics import read_metrics  # a half-written last line (a killed run) is dropped

    rows = read_metrics(metrics_path)
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    steady = rows[len(rows) // 10:] or rows  # the first steps compile
    return {"steps": rows[-1]["step"], "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steady])),
            "answer_tokens_per_s": float(np.median([r["answer_tokens_per_s"] for r in steady]))}


def build_base(config: ConfigDict) -> dict[str, Any]:
    """Runs (or resumes) the steps above; returns the summary written to DIR/base.json."""
    from viper_jax.sft.trainer import train as sft_train

    validate(config)
    workdir = Path(config.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    _timed(seconds, "data", _write_data, config, workdir / "data")
    tokenizer = _timed(seconds, "tokenizer", _write_tokenizer, config, workdir / "data" / "tokenizer")
    vision = _timed(seconds, "init_model", _write_init_model, config, tokenizer, workdir / "init_model")
    write_processor_configs(workdir / "init_model", tokenizer, int(config.world.size))
    sft = sft_settings(config, workdir)
    # The init model directory carries the world tokenizer, so the export does too.
    _timed(seconds, "sft", sft_train, sft)
    summary = {"base_hf": str(workdir / "base_hf"), "seconds": seconds, "settings": config.to_dict(),
               "vision_pretrain": vision, "sft": _sft_summary(Path(sft.workdir) / "metrics.jsonl")}
    write_json_atomic(workdir / "base.json", summary)
    return summary
