"""`viper generate` on a tiny HF directory and its Orbax conversion: prints responses, and its greedy
tokens equal transformers' generate on the prompt built by transformers' own Qwen2.5-VL processor."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_vlm import build_tiny_vlm_dir, image_bytes  # noqa: E402
from viper_jax.cli import main as viper  # noqa: E402

NEW = 12
PROMPT = "Describe the picture. Be brief."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = build_tiny_vlm_dir(root / "model", seed=2)
    images = []
    for k, size in enumerate([(56, 84), (70, 56)]):
        images.append(root / f"img{k}.png")
        images[-1].write_bytes(image_bytes(10 + k, size))
    return root, model, images


def _generate(model, images, out, *extra):
    args = ["generate", "--model", str(model), "--prompt", PROMPT, "--max_new_tokens", str(NEW),
            "--output_json", str(out), *extra]
    for img in images:
        args += ["--image", str(img)]
    viper(args)
    return json.loads(out.read_text())


def _transformers_greedy(model_dir, images):
    from PIL import Image
    from transformers import (AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor)

    from viper_jax.inference import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=DEFAULT_MIN_PIXELS,
                                                                        max_pixels=DEFAULT_MAX_PIXELS),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[text], images=[Image.open(p) for p in images], return_tensors="pt")
    assert "mm_token_type_ids" in inputs  # without it HF Qwen2.5-VL silently uses 1D positions
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    prompt = inputs["input_ids"][0].numpy()
    return prompt, out[0, len(prompt):].numpy(), hf.generation_config.eos_token_id


def _trim(ids, eos):
    out = []
    for t in np.asarray(ids).tolist():
        out.append(t)
        if t in eos:
            break
    return out


@pytest.mark.parametrize("n_images", [1, 2])
def test_greedy_matches_transformers(setup, n_images, capsys):
    root, model, images = setup
    res = _generate(model, images[:n_images], root / f"out{n_images}.json")
    printed = capsys.readouterr()
    assert printed.out == res["responses"][0] + "\n"
    assert "tokens/s" in printed.err and "KV cache" in printed.err and f"{n_images} image(s)" in printed.err
    assert res["kv_cache_bytes"] > 0 and len(res["image_grid_thw"]) == n_images
    prompt, ref, eos = _transformers_greedy(model, images[:n_images])
    np.testing.assert_array_equal(res["prompt_ids"], prompt)
    assert res["response_ids"][0] == _trim(ref, eos)


def test_orbax_checkpoint_and_sampling(setup, capsys):
    root, model, images = setup
    ckpt = root / "ckpt"
    viper(["convert", "hf-to-orbax", "--hf_dir", str(model), "--out", str(ckpt)])
    with pytest.raises(FileNotFoundError, match="pass --tokenizer_dir"):
        _generate(ckpt, images[:1], root / "x.json")
    from_orbax = _generate(ckpt, images[:1], root / "orbax.json", "--tokenizer_dir", str(model))
    from_hf = _generate(model, images[:1], root / "hf.json")
    assert from_orbax["response_ids"] == from_hf["response_ids"]
    capsys.readouterr()
    sampled = _generate(model, images[:1], root / "s.json", "--samples", "3", "--temperature", "1.0",
                        "--top_k", "50", "--seed", "4")
    printed = capsys.readouterr().out
    assert len(sampled["responses"]) == 3 and printed.count("--- sample") == 3
    assert len({tuple(r) for r in sampled["response_ids"]}) > 1
