"""ViPER on Qwen2.5-VL-7B-Instruct with the paper's settings (shared/reference/viper_method.md):
group size 5, 128 prompts per step, temperature 1.0, no KL, DAPO's decoupled clip 0.2 / 0.28, the loss
normalised per sample ((1/G) sum_i 1/|o_i| sum_t: `seq-mean-token-mean`), the reward's sentence
embeddings by BGE-M3 with tau 0.85, the same hyper-parameters for both stages; lr 1e-6, AdamW wd 0.01,
grad-norm clip 1.0, responses up to 2K tokens (the common Qwen2.5-VL-7B GRPO settings, since the paper
does not give them).

    viper train --config configs/qwen2_5_vl_7b.py --workdir /ckpt/viper7b \
        --config.model.path=/models/Qwen2.5-VL-7B-Instruct \
        --config.reward.embedding_model=/models/bge-m3 \
        --config.stages.caption_refine.data_globs="/data/viper/caption_refine-*/part-*.arrayrecord" \
        --config.stages.visual_ops.data_globs="/data/viper/visual_ops-*/part-*.arrayrecord"

Memory (one host): fp32 master weights + AdamW moments are 16 bytes/parameter (8.3B -> ~133 GB), sharded
over `fsdp`; bf16 compute, full remat and a chunked lm_head keep activations to a few GB per device.

BGE-M3 is read from a local sentence-transformers directory (`reward.embedding_model`; nothing is
downloaded): a missing directory stops the stage at its start with a message naming the key.
"""

from viper_jax.train.config import base_config, stage


BGE_M3_PATH = "/models/bge-m3"  # a local copy of BAAI/bge-m3 (sentence-transformers layout)


def get_config(model_path: str = "/models/Qwen2.5-VL-7B-Instruct"):
    c = base_config()
    c.model.path = model_path
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.attention_query_chunk = 1024  # 5120-position rows: scores of 1024 queries at a time
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every device of the host
    # Viper10K: 7K CSR + 3K VOP samples; ~1 epoch per stage at 128 prompts per step.
    c.stages.caption_refine = stage("caption_refine", ("data/viper/caption_refine-*/part-*.arrayrecord",), 55)
    c.stages.visual_ops = stage("visual_ops", ("data/viper/visual_ops-*/part-*.arrayrecord",), 24)
    c.data.length_buckets = (1024, 1536, 2048, 3072)
    c.data.worker_count = 4
    c.rollout.max_new_tokens = 2048
    c.rollout.temperature = 1.0
    c.rl.prompts_per_step = 128
    c.rl.group_size = 5
    c.rl.num_minibatches = 4  # 32 prompts (160 responses) per optimizer update, verl-style mini-batches
    c.rl.micro_batch_prompts = 4
    c.rl.eps_low, c.rl.eps_high = 0.2, 0.28
    c.rl.kl_coef = 0.0
    c.rl.aggregation = "seq-mean-token-mean"  # the paper's per-sample normalisation, not per token
    c.rl.recompute_old_logprobs = True  # bf16 decode vs full forward differ slightly: use the forward's
    c.rl.logit_chunk = 256
    c.reward.embedding_model = BGE_M3_PATH  # the paper's embedding model
    c.reward.tau = 0.85
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 3
    return c
