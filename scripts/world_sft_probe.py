"""Where does `viper sft` lose the image signal that scripts/world_read_probe.py's decoder finds? One run.

Trains a ShapeWorld init model (its tower pretrained, kept frozen) with `viper sft`'s own stack (model setup,
optimizer, jitted update, SFT examples and batches) on instruct records, with the loss on every answer token
(`--loss answer`, what `viper sft` does) or only on the answer tokens that are hue words (`--loss colour`),
then measures on held-out one-object images (base_train seeds the data did not use) how often the colour
token is the argmax, with each row's own image and with another row's.

    python scripts/world_sft_probe.py --init runs/world_base/init_model \
        --records 'runs/one_object_data/*.arrayrecord' --loss colour
"""

from __future__ import annotations

import argparse
import glob
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from viper_common import records
from viper_common.shapeworld import render
from viper_common.shapeworld import scene as S
from viper_common.shapeworld.splits import seed_block
from viper_jax.data.processing import build_prompt, make_image_processor
from viper_jax.sft.config import base_config
from viper_jax.sft.data import SFTCollator, SFTExample, SFTProcessor
from viper_jax.sft.step import model_inputs
from viper_jax.train.grpo_step import response_logprobs
from viper_jax.train.model_source import setup_model
from viper_jax.train.optim import make_optimizer
from viper_jax.train.resume import init_or_restore
from viper_jax.train.state import make_train_step, train_state_shardings
from viper_jax import checkpoint

PIXELS = 112 * 112
BUCKETS = (96, 128, 160, 224)


def loss_fn(graphdef, hue_ids: jnp.ndarray, colour_only: bool):
    def fn(params, inputs):
        model = nnx.merge(graphdef, params)
        x = model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["vision_inputs"])
        hidden, _ = model.language_model(x, inputs["positions"], inputs["attention_mask"])
        targets = inputs["input_ids"][:, 1:]
        logp, _ = response_logprobs(model, hidden[:, :-1], targets, 1.0, 0)
        weight = inputs["loss_mask"][:, 1:].astype(jnp.float32)
        if colour_only:
            weight = weight * jnp.isin(targets, hue_ids)
        return -(logp * weight).sum() / jnp.maximum(weight.sum(), 1.0), {}
    return fn


def held_out(tokenizer, processor, n: int) -> list[SFTExample]:
    """One-object images asked for their colour, with the base data's own answer wording."""
    out = []
    for seed in seed_block("base_train", 62, n):
        scene = S.sample_scene(np.random.default_rng(seed), 1, 1)
        prompt = build_prompt(tokenizer, processor, [render.render(scene, seed, 112)],
                              "Tell me the colour of the object.")
        answer = tokenizer(f"<think>I look at the object.</think><answer>It is {scene.objects[0].hue}.</answer>",
                           add_special_tokens=False)["input_ids"]
        ids = np.concatenate([prompt.input_ids, np.asarray(answer + [tokenizer.convert_tokens_to_ids("<|im_end|>")],
                                                           np.int32)])
        out.append(SFTExample(id=str(seed), task="instruct", truth=(), input_ids=ids, pixel_values=prompt.pixel_values,
                              image_grid_thw=prompt.image_grid_thw, answer_length=len(answer) + 1))
    return out


def colour_accuracy(graphdef, params, examples, collator, config, hue_ids) -> float:
    model = nnx.merge(graphdef, params)
    inputs = model_inputs(collator(examples), config, 0)
    x = model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["vision_inputs"])
    hidden, _ = model.language_model(x, inputs["positions"], inputs["attention_mask"])
    logits = np.asarray(model.logits_from_hidden(hidden[:, :-1]))
    targets = np.asarray(inputs["input_ids"][:, 1:])
    at = np.isin(targets, np.asarray(hue_ids)) & (np.asarray(inputs["loss_mask"][:, 1:]) > 0)
    return float((logits.argmax(-1)[at] == targets[at]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="HF directory of the init model (pretrained tower)")
    p.add_argument("--records", required=True, help="glob of instruct shards")
    p.add_argument("--loss", choices=("answer", "colour"), default="answer")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    cfg = base_config()
    cfg.workdir = tempfile.mkdtemp()
    cfg.model.path, cfg.model.scan_layers = args.init, False
    cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.optim.weight_decay = args.lr, 20, 0.0
    cfg.optim.frozen = ("visual",)
    setup = setup_model(cfg, Path(cfg.workdir))
    optimizer, _ = make_optimizer(cfg.optim, args.steps)
    shardings = train_state_shardings(optimizer, setup.abstract_params, setup.param_shardings)
    state, _, _ = init_or_restore(checkpoint.TrainCheckpointer(Path(cfg.workdir) / "c", keep=1), setup, cfg,
                                  optimizer, shardings)
    tok = setup.tokenizer
    hue_ids = jnp.asarray([tok(" " + h, add_special_tokens=False)["input_ids"][0] for h in S.HUES])
    step = make_train_step(loss_fn(setup.graphdef, hue_ids, args.loss == "colour"), optimizer, shardings, None,
                           setup.rules)
    processor = make_image_processor(PIXELS, PIXELS)
    sft = SFTProcessor(tok, processor, {}, BUCKETS[-1])
    collator = SFTCollator(BUCKETS, tok.pad_token_id, sft.image_id, sft.video_id)
    examples = [sft(d) for path in sorted(glob.glob(args.records)) for d in records.read_shard(path)]
    test = held_out(tok, processor, 64)
    rolled = [SFTExample(**{**e.__dict__, "pixel_values": test[(i + 1) % len(test)].pixel_values})
              for i, e in enumerate(test)]
    rng = np.random.default_rng(0)
    for k in range(1, args.steps + 1):
        batch = collator([examples[i] for i in rng.choice(len(examples), 32, replace=False)])
        state, out = step(state, model_inputs(batch, setup.config, 0))
        if k % 50 == 0:
            own = colour_accuracy(setup.graphdef, state.params, test, collator, setup.config, hue_ids)
            other = colour_accuracy(setup.graphdef, state.params, rolled, collator, setup.config, hue_ids)
            print(f"step {k}: loss {float(out['loss']):.3f}, held-out colour token right {own:.3f} with its own "
                  f"image, {other:.3f} with another row's", flush=True)


if __name__ == "__main__":
    main()
