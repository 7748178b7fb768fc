"""The ShapeWorld base model (viper_jax/world/base.py): a tiny Qwen2.5-VL trained from random init with
`viper sft` on the world's general skills, on this 2-core CPU.

    viper world base --workdir runs/world_base --config configs/world_base.py

Text 128 wide x 4 layers, vision 96 wide x 3 blocks. The vision tower is pretrained first on the world's
coarse content (world/vision_pretrain.py) and stays frozen during the SFT, which teaches the decoder to read
it: trained end to end from random init, the base never read its images (docs/shapeworld.md). Lengths cover
the longest base example (a "follow" example: a quoted five-object caption and a five-sentence list, about 300
tokens).
"""

from viper_jax.world.base import base_config


def get_config():
    c = base_config()
    c.world.n_train = 16000
    c.world.one_object_share = 0.25
    c.world.weights.update(describe=0.25, ask=0.2, compare=0.15, choose=0.25, edit=0.15, follow=0.2)
    # base10: instruction following with long prompts (kind "follow": a quoted text, then a question or a list
    # request, often an answer-format instruction). base9, without it, answered ViPER's long caption-refine
    # prompt with an empty <think><answer> block in 6 of 6 samples (runs rq12-rq14): GRPO got no reward spread.
    # base7: the editing requests of stage-2 synthesis (kind "edit"), and multiple-choice answers in the option's
    # words (base4 answered with one letter per question kind). Val, options by likelihood: 37.7% (base6 33.3%).
    c.world.mcq_answer = "text"
    # Differences as "- " lines: the list format the synthesis's critique needs (base6; without it the base's
    # critiques were empty, run rq4). Its open readings were lower than base4's (hue 37.5% vs 54.7%).
    c.world.compare_lists = True
    # base12: 10,000 tower steps on a pool of 32,000 rendered scenes (rendered once in world.workers processes,
    # mirrored at random): shape at object tokens 0.86 on fresh scenes, where base10's 600 steps reached 0.19 and
    # 3,000 fresh-scene steps 0.35 (docs/shapeworld.md, "A tower that encodes shape").
    c.vision.steps = 10000
    c.vision.pool_scenes = 32000
    s = c.sft
    s.steps = 800
    s.optim.frozen = ("visual",)
    s.sft.focus_steps = 450  # the loss on the answers' content words only (sft.focus_steps), then
    s.sft.focus_weight = 8.0  # every answer token, content words 8x: the full loss alone erodes the reading
    s.model.scan_layers = False  # per-layer modules: faster steps for a small model on CPU
    s.data.batch_size = 32
    s.sft.images_per_batch = 64  # 1- and 2-image examples: one compiled program per length bucket
    s.data.length_buckets = (96, 128, 160, 224, 320)  # follow examples reach about 300 tokens
    s.data.read_threads = 1
    s.optim.learning_rate = 2e-3
    s.optim.warmup_steps = 50
    s.optim.schedule = "cosine"
    s.optim.final_lr_fraction = 0.1
    s.optim.weight_decay = 0.0
    s.checkpoint.every_steps = 250
    s.checkpoint.keep = 2
    s.logging.every_steps = 25
    return c
