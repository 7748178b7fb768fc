"""Trainer configuration: the schema with its defaults, config files, `--config.a.b=value` overrides,
and validation that names the culprit.

A config file is a Python file with `get_config()` returning `base_config()` with changes (see
configs/). Every key a file or an override sets must already exist in the schema: a typo such as
`rl.grup_size` is refused instead of being silently ignored. Stages are open-ended (any name), but
each stage has exactly the keys of `stage()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ml_collections import ConfigDict

from viper_common import config_overrides
from viper_common.config_overrides import ConfigError, apply_overrides, load_config_file  # noqa: F401 (re-exported)
from viper_jax.data.config import get_data_config
from viper_jax.dtypes import DTYPE_NAMES, dtype_named
from viper_jax.rl.reward import MATCHERS, get_reward_config

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
SCHEDULES = ("constant", "cosine")
# layers.remat_policy: offload keeps what dots keeps, in pinned host memory (frees HBM on TPU; on CPU a copy).
REMATS = ("none", "full", "dots", "offload")
ADVANTAGE_SCALES = ("group", "batch", "none")
ATTENTIONS = ("xla", "splash", "cudnn", "auto")  # = models.qwen2_5_vl.attention_kernels.ATTENTIONS (kept light here)


def stage(task: str, data_globs: Sequence[str] = (), steps: int = 1, reward: str = "") -> ConfigDict:
    """One training stage: records of `task` from `data_globs`, for `steps` GRPO steps, scored by the
    reward registered as `reward` (default: the task's own, i.e. the ViPER reward)."""
    return ConfigDict(dict(task=task, data_globs=tuple(data_globs), steps=steps, reward=reward or task))


# Sections whose keys are free-form: prompt overrides by task (checked by the data config), stages by name.
OPEN_SECTIONS = {"data.prompts": None, "stages": stage}


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = ""  # checkpoints, metrics.jsonl, tensorboard/, config.json (required)
    # `viper train` on the CPU backend: glibc keeps freed memory, so XLA's per-step temporaries are not
    # mapped and page-faulted in again every step (viper_jax/host_memory.py; the process stays at its peak).
    c.keep_freed_host_memory = False
    # JAX's persistent compilation cache (viper_jax/compile_cache.py): "" = $VIPER_JAX_CACHE_DIR, else
    # ~/.cache/viper_jax/jax_cache; "off" = none. A rerun loads its compiled programs instead of compiling.
    c.compile_cache_dir = ""
    c.seed = 0  # the rollout RNG of step s is fold_in(key(seed), s): resumable without stored RNG streams

    c.model = ConfigDict()
    c.model.path = ""  # HF directory (config.json + safetensors) or Orbax checkpoint directory
    c.model.tokenizer_path = ""  # default: model.path
    c.model.dtype = "float32"  # compute dtype; master weights and optimizer state are always fp32
    c.model.remat = "none"
    # Layers under one lax.scan (compile time flat in depth: real models); False holds one module per layer
    # and unrolls them: faster steps for small models on CPU, compile time linear in depth. Checkpoints
    # keep the layout they were trained in; load_orbax converts between the two.
    c.model.scan_layers = True
    # Decoder attention over this many queries at a time (0 = all): bounds the fp32 scores of long
    # sequences (GRPO's prompt + response) to [heads, chunk, T] per row; same result, one more score pass.
    c.model.attention_query_chunk = 0
    # The decoder's attention in training forward passes and rollout prefills (decode steps always run xla):
    # "xla" (attention.py, the matmul form), "splash" (Pallas splash attention; TPU), "cudnn"
    # (jax.nn.dot_product_attention's cuDNN kernel; GPU, bf16/fp16), "auto" (splash on TPU, cudnn on GPU with a
    # bf16/fp16 compute dtype, xla otherwise). See models/qwen2_5_vl/attention_kernels.py.
    c.model.attention = "xla"
    # Write a random-init tiny Qwen2.5-VL (+ byte-level tokenizer) to model.path, or <workdir>/tiny_model
    # when model.path is empty, if no model is there yet (CPU demo and tests).
    c.model.tiny_init = False
    c.model.tiny_seed = 0

    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = ()  # ((logical name, mesh axis | (axes,) | None), ...) over sharding.DEFAULT_RULES
    # heartbeat_timeout_s: a process silent this long counts as dead; every other process then stops with one
    # line and exit status 1 (peer_loss.py). A collective with a dead peer fails at once; this bounds the rest.
    c.distributed = ConfigDict(dict(coordinator="", num_processes=0, process_id=-1, auto=False,
                                    cpu_collectives="", timeout_s=300, heartbeat_timeout_s=100))

    # Input pipeline defaults for every stage; shard_globs come from the stage and batch_size from
    # rl.prompts_per_step (both are overwritten per stage).
    c.data = get_data_config()
    # Prompt buckets from the data (viper_jax/data/auto_buckets.py): up to this many, from the maxima of batches
    # drawn from a sample of every stage's records, under max(data.length_buckets) (the limit, kept as the last
    # bucket). 0: data.length_buckets as given. The chosen ones are logged at the start.
    c.data.auto_buckets = 4
    c.data.auto_buckets_sample = 128  # records per stage, spread evenly over its shards
    c.data.auto_buckets_multiple = 64

    c.stage_order = ("caption_refine", "visual_ops")  # run in this order, never mixed (the paper)
    c.stages = ConfigDict()
    c.stages.caption_refine = stage("caption_refine", ("data/viper/caption_refine-*/part-*.arrayrecord",), 100)
    c.stages.visual_ops = stage("visual_ops", ("data/viper/visual_ops-*/part-*.arrayrecord",), 100)

    c.rollout = ConfigDict()
    c.rollout.max_new_tokens = 1024
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.eos_tokens = ("<|im_end|>", "<|endoftext|>")  # Qwen2.5-VL-Instruct's generation_config
    # Strings that end a response, included in it (vLLM's stop): e.g. ("</answer>",) for a policy that does not
    # yet end its turn after the answer block. Cut on the host after decoding (rollout/stop.py).
    c.rollout.stop_strings = ()
    c.rollout.cache_dtype = ""  # default: the compute dtype
    # Rows that ended leave the decode batch as it halves (same tokens, see rollout.engine.decode), to sizes
    # that are multiples of this. -1: auto (halving at most 3 times, multiples of the batch's mesh shards);
    # 0: off, every row holds its slot until the longest response ends. rollout/useful_slot_share shows it.
    c.rollout.shrink_rows = -1

    c.rl = ConfigDict()
    c.rl.prompts_per_step = 128  # the rollout batch R: prompts sampled (x group_size) per step
    c.rl.group_size = 5
    c.rl.ppo_epochs = 1  # passes over each rollout batch
    # The update batch U: prompts (x group_size responses) per optimizer update. The rollout batch is cut
    # into R / U mini-batches, one update each, all against the old log-probs of the rollout policy
    # (EasyR1: 512 rolled out, updates of 128). 0 = R / num_minibatches (by default U = R: one update).
    c.rl.update_prompts = 0
    c.rl.num_minibatches = 1  # optimizer updates per pass when update_prompts is 0 (whole prompt groups each)
    c.rl.micro_batch_prompts = 0  # prompts per forward/backward (gradient accumulation); 0 = whole minibatch
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.28
    c.rl.dual_clip = 0.0  # c > 1 turns the dual clip on for negative advantages; 0 = off
    c.rl.aggregation = "token-mean"
    c.rl.kl_coef = 0.0  # > 0 keeps a frozen reference (the initial policy) and adds kl_coef * agg(KL)
    c.rl.kl_estimator = "k3"
    c.rl.entropy_coef = 0.0
    c.rl.advantage_scale = "group"
    c.rl.advantage_eps = 1e-6
    c.rl.drop_zero_spread = False  # mask out groups whose rewards are all equal (no signal)
    c.rl.recompute_old_logprobs = False  # True: a full forward gives the old log-probs (verl/EasyR1)
    c.rl.logit_chunk = 0  # response tokens per lm_head chunk (rematerialised); 0 = all at once
    # Sequence packing (train/packing.py): each response's prompt + response tokens are a segment of packed rows
    # (attention within segments, per-segment MRoPE positions), so the update runs on real tokens only; same
    # loss, gradients and metrics as the padded rows (tests/test_packing.py), in one JAX process or several
    # (tests/test_train_multiprocess.py).
    c.rl.packing = False
    # Token budget of a packed micro-batch, over all processes; 0 = the padded micro-batch's (rows x row width).
    c.rl.pack_tokens = 0
    # > 0: the update's response span is the batch's longest counted response rounded up to this * 2^k (at most
    # rollout.max_new_tokens) instead of max_new_tokens; same results. 0 = off.
    c.rl.response_bucket = 0

    c.optim = ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"  # after warmup
    c.optim.warmup_steps = 0  # optimizer updates
    c.optim.final_lr_fraction = 0.0  # cosine ends at learning_rate * this
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global norm; 0 = off
    c.optim.decay_norms_and_biases = True  # torch AdamW (verl) decays every parameter
    # Parameter path prefixes that are not trained (e.g. ("visual",)): no update, no optimizer moments.
    c.optim.frozen = ()

    c.reward = get_reward_config()

    c.checkpoint = ConfigDict(dict(every_steps=50, keep=3, async_save=True))
    c.logging = ConfigDict(dict(every_steps=1, tensorboard=True, progress_bar=True, record_ids=True))
    c.export = ConfigDict(dict(hf_dir=""))  # write the final policy here as an HF directory
    return c


# ------------------------------------------------------------------------------------------------ loading

def load_config(path: str | Path) -> ConfigDict:
    """`get_config()` of a Python file, checked against the schema (unknown keys refused)."""
    return load_config_file(path, base_config(), OPEN_SECTIONS)


def check_keys(config: ConfigDict) -> None:
    """Every key of `config` must exist in base_config(); stages match `stage()`."""
    config_overrides.check_keys(config, base_config(), OPEN_SECTIONS)


def override_flags(values: dict[str, Any]) -> list[str]:
    """`viper train` flags that set `values` (dotted key -> value), checked against the schema: how another
    command (`viper loop`, `viper demo`) configures a training run it starts as a subprocess."""
    return config_overrides.override_flags(values, base_config(), OPEN_SECTIONS)


# ------------------------------------------------------------------------------------------------ values

def model_options(config: ConfigDict, platform: str | None = None) -> dict[str, Any]:
    """The `Qwen2_5_VL(...)` keyword arguments that `config.model` sets beside the dtypes (trainer, plan).
    model.attention is resolved for `platform` (default: this process's backend): a kernel the platform
    lacks is a ConfigError naming the key."""
    from viper_jax.models.qwen2_5_vl.attention_kernels import resolve_attention

    m = config.model
    try:
        attention = resolve_attention(m.attention, platform, dtype_named(m.dtype))
    except ValueError as e:
        raise ConfigError(f"config {e}") from None
    return dict(remat=m.remat, scan_layers=m.scan_layers, attention_query_chunk=m.attention_query_chunk,
                attention=attention)


def minibatches_per_pass(rl: ConfigDict) -> int:
    """Optimizer updates per pass over a rollout batch: R / U with rl.update_prompts, else rl.num_minibatches."""
    return rl.prompts_per_step // rl.update_prompts if rl.update_prompts > 0 else rl.num_minibatches


def updates_per_step(rl: ConfigDict) -> int:
    """Optimizer updates per GRPO step (the learning-rate schedule counts these)."""
    return rl.ppo_epochs * minibatches_per_pass(rl)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}: {message}")


def validate_shared(config: ConfigDict) -> None:
    """The sections `viper train` and `viper sft` share: workdir, model, optim, checkpoint."""
    _require(bool(config.workdir), "workdir", "is required (--workdir or --config.workdir=...)")
    _require(bool(config.model.path) or config.model.tiny_init, "model.path", "is required")
    _require(config.model.dtype in DTYPE_NAMES, "model.dtype", f"must be one of {DTYPE_NAMES}")
    _require(config.model.remat in REMATS, "model.remat", f"must be one of {REMATS}")
    _require(config.model.attention_query_chunk >= 0, "model.attention_query_chunk", "must be >= 0 (0 = off)")
    _require(config.model.attention in ATTENTIONS, "model.attention",
             f"{config.model.attention!r} is not one of {ATTENTIONS}")
    _require(config.optim.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}")
    _require(config.optim.learning_rate > 0, "optim.learning_rate", "must be positive")
    _require(config.checkpoint.every_steps >= 1 and config.checkpoint.keep >= 1, "checkpoint",
             "every_steps and keep must be positive")


def validate(config: ConfigDict) -> None:
    """Values that would fail later (or silently do the wrong thing) are refused now, by key."""
    check_keys(config)
    validate_shared(config)
    rl = config.rl
    _require(rl.group_size >= 2, "rl.group_size", "must be at least 2 (GRPO compares responses in a group)")
    _require(rl.prompts_per_step >= 1, "rl.prompts_per_step", "must be positive")
    _require(rl.update_prompts >= 0, "rl.update_prompts", "must be >= 0 (0 = rl.prompts_per_step / rl.num_minibatches)")
    if rl.update_prompts > 0:
        _require(rl.update_prompts <= rl.prompts_per_step and rl.prompts_per_step % rl.update_prompts == 0,
                 "rl.update_prompts", f"{rl.update_prompts} does not divide the rollout batch rl.prompts_per_step "
                                      f"{rl.prompts_per_step}")
        _require(rl.num_minibatches in (1, rl.prompts_per_step // rl.update_prompts), "rl.num_minibatches",
                 f"{rl.num_minibatches} contradicts rl.update_prompts {rl.update_prompts} "
                 f"({rl.prompts_per_step // rl.update_prompts} updates per pass); set only one of the two")
    _require(rl.num_minibatches >= 1 and rl.prompts_per_step % rl.num_minibatches == 0, "rl.num_minibatches",
             f"{rl.num_minibatches} does not divide rl.prompts_per_step {rl.prompts_per_step}")
    per_minibatch = rl.prompts_per_step // minibatches_per_pass(rl)
    _require(rl.micro_batch_prompts >= 0 and (rl.micro_batch_prompts == 0 or per_minibatch % rl.micro_batch_prompts == 0),
             "rl.micro_batch_prompts", f"{rl.micro_batch_prompts} does not divide the {per_minibatch} prompts of a minibatch")
    _require(rl.ppo_epochs >= 1, "rl.ppo_epochs", "must be at least 1")
    _require(rl.pack_tokens >= 0 and rl.response_bucket >= 0, "rl.pack_tokens/response_bucket",
             "must be >= 0 (0 = auto / off)")
    _require(rl.aggregation in AGGREGATIONS, "rl.aggregation", f"must be one of {AGGREGATIONS}")
    _require(rl.kl_estimator in KL_ESTIMATORS, "rl.kl_estimator", f"must be one of {KL_ESTIMATORS}")
    _require(rl.advantage_scale in ADVANTAGE_SCALES, "rl.advantage_scale", f"must be one of {ADVANTAGE_SCALES}")
    _require(rl.eps_low > 0 and rl.eps_high > 0, "rl.eps_low/eps_high", "must be positive")
    _require(rl.dual_clip == 0 or rl.dual_clip > 1, "rl.dual_clip", "must be 0 (off) or greater than 1")
    _require(rl.kl_coef >= 0 and rl.entropy_coef >= 0, "rl.kl_coef/entropy_coef", "must be non-negative")
    _require(config.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be positive")
    _require(config.data.get("auto_buckets", 0) >= 0, "data.auto_buckets", "must be 0 (off) or positive")
    _require(config.data.get("auto_buckets_sample", 1) >= 1 and config.data.get("auto_buckets_multiple", 1) >= 1,
             "data.auto_buckets_sample/auto_buckets_multiple", "must be positive")
    _require(config.rollout.get("shrink_rows", -1) >= -1, "rollout.shrink_rows",
             "must be -1 (auto), 0 (off) or positive")
    stops = config.rollout.get("stop_strings", ())
    _require(isinstance(stops, (tuple, list)) and all(isinstance(x, str) and x for x in stops),
             "rollout.stop_strings", f"must be a tuple of non-empty strings, got {stops!r}")
    _require(config.rollout.temperature > 0, "rollout.temperature",
             "must be positive (GRPO samples; log-probs are taken under it)")
    _require(config.reward.get("matcher", "embedding") in MATCHERS, "reward.matcher", f"must be one of {MATCHERS}")
    _require(len(config.stage_order) > 0, "stage_order", "lists no stage")
    for name in config.stage_order:
        _require(name in config.stages, "stage_order", f"names stage {name!r}, which config.stages does not define "
                                                       f"(defined: {sorted(config.stages.keys())})")
        stage_config = config.stages[name]
        _require(stage_config.steps >= 1, f"stages.{name}.steps", "must be positive")
        _require(len(stage_config.data_globs) > 0, f"stages.{name}.data_globs", "is empty: the stage has no data")
