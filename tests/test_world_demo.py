"""`viper demo` in ShapeWorld (world/demo.py): the quick reproduce's plan without controls, on the base given,
shipped or built; a user's mistake is one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

from grpo_tiny import ROOT
from viper_jax.world import demo
from viper_jax.world.reproduce import Plan


def _names(plan: Plan) -> list[str]:
    return [st.name for st in plan.steps]


def test_demo_plan_is_one_round_of_the_quick_reproduce_without_controls(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SHIPPED_BASE", tmp_path / "no_shipped_base")
    built = Plan(demo.demo_settings(tmp_path / "w", None, None, None), viper=["viper"])
    names = _names(built)
    assert names[0] == "base" and built.steps[0].cmd[:5] == ["viper", "world", "base", "--workdir", str(tmp_path / "w" / "base")]
    assert "bench" in names and "eval_base" in names and "eval_viper_s0_r0" in names
    assert not [n for n in names if n.startswith(("sft", "stage1", "stage2", "shuffle"))], names
    assert built.s.images == 24 and built.s.steps == {"caption_refine": 3, "visual_ops": 3} and built.s.rounds == 1

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "SHIPPED_BASE", shipped)
    plan = Plan(demo.demo_settings(tmp_path / "w", None, 8, 2), viper=["viper"])
    assert plan.base == shipped and "base" not in _names(plan)
    assert plan.s.images == 8 and plan.s.steps == {"caption_refine": 2, "visual_ops": 2}
    given = Plan(demo.demo_settings(tmp_path / "w", str(tmp_path / "mine"), None, None), viper=["viper"])
    assert given.base == tmp_path / "mine"


def test_demo_user_errors_are_one_line(tmp_path):
    env = {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    for args, message in (
            (["--base_hf", str(tmp_path / "missing")], "is not an HF model directory"),
            (["--steps", "0"], "--steps must be >= 1"),
            (["--photos", "--base_hf", str(tmp_path)], "--base_hf is for the ShapeWorld demo")):
        done = subprocess.run([sys.executable, "-m", "viper_jax", "demo", "--workdir", str(tmp_path / "d"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert message in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "d").exists()  # nothing started


def test_the_shipped_base_loads_in_transformers_and_answers_in_the_reasoning_format():
    """assets/world_base is what `viper demo` runs on by default: a real HF directory (model, tokenizer,
    processor) that writes a <think>/<answer> reply to a world question about a rendered scene."""
    import numpy as np
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from viper_common.shapeworld.render import render
    from viper_common.shapeworld.scene import sample_scene

    assert (demo.SHIPPED_BASE / "config.json").is_file()
    processor = AutoProcessor.from_pretrained(demo.SHIPPED_BASE)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo.SHIPPED_BASE).eval()
    image = render(sample_scene(np.random.default_rng(123_456)), seed=123_456)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=80, do_sample=False)
    reply = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert reply.lstrip().startswith("<think>") and "<answer>" in reply, reply
