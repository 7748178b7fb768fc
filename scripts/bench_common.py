"""The ~30M-parameter Qwen2.5-VL used by the benchmarks, built once in transformers (random weights)
and loaded into JAX through a real HF directory, so both sides compute with identical parameters."""

from __future__ import annotations

import os
import resource
import tempfile
import time

import numpy as np

IMAGE, VIDEO, VSTART, VEND, PAD, EOS = 8000, 8001, 8002, 8003, 0, 1


def bench_config_dict() -> dict:
    """Text hidden 512 x 8 layers, vision hidden 256 x depth 4: about 33M parameters."""
    return dict(
        text_config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                             "mrope_section": [8, 12, 12]},
                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD),
        vision_config=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=512,
                           fullatt_block_indexes=[3], tokens_per_second=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=False)


def build_models(attn_implementation: str = "eager"):
    """(HF torch model, its saved directory). The JAX side loads the directory with load_hf."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(**bench_config_dict())
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation,
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # no all-zero biases / unit norms
    path = tempfile.mkdtemp(prefix="viper_bench_")
    model.save_pretrained(path)
    return model, path


def image_batch(batch: int, text_tokens: int, image_px: int = 112, seed: int = 0) -> dict:
    """`batch` prompts, each `text_tokens` random tokens around one image of image_px x image_px."""
    rng = np.random.default_rng(seed)
    grid = image_px // 14
    n_img = grid * grid // 4
    before = text_tokens // 2
    row = lambda: ([*rng.integers(10, 7000, before)] + [VSTART] + [IMAGE] * n_img + [VEND]
                   + [*rng.integers(10, 7000, text_tokens - before)])
    ids = np.asarray([row() for _ in range(batch)], np.int64)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids),
                mm_token_type_ids=(ids == IMAGE).astype(np.int64),
                pixel_values=rng.normal(size=(batch * grid * grid, 1176)).astype(np.float32),
                image_grid_thw=np.asarray([[1, grid, grid]] * batch, np.int64))


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """(JAX, torch) fp32 FLOP/s of an n^3 matmul, measured now (the machine is shared and noisy)."""
    import jax
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    jax_rate = 2 * n**3 * repeats / (time.perf_counter() - t)
    b = torch.randn(n, n)
    b @ b
    t = time.perf_counter()
    for _ in range(repeats):
        b @ b
    return jax_rate, 2 * n**3 * repeats / (time.perf_counter() - t)


def time_interleaved(fns: dict, steps: int, warm_each: bool = False, faults: dict | None = None) -> dict:
    """Median seconds per step of each fn, timed round-robin (one step of each per round) so that a
    drifting machine load hits every contender alike; the first call of each (JAX compiles) is untimed.
    The order rotates every round, so that no contender always runs in the same place.

    warm_each: run each fn once untimed right before its timed call, for fns of a few ms. PyTorch's
    OpenMP workers spin-wait for a few ms after each parallel region and take a core from whatever runs
    next: a 1080x512x1536 JAX matmul measured here took 11.8 ms right after a torch matmul, 9.8 ms 5 ms
    later, 9.0 ms 20 ms later. A 1.4 s training step (bench_model.py) loses under 1% to it.
    faults: if given, filled with each fn's median minor page faults per timed call (the process's, so
    a library's background threads count too)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {name: [] for name in fns}
    minflt = {name: [] for name in fns}
    for r in range(steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if warm_each:
                fns[name]()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
            minflt[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    if faults is not None:
        faults.update({name: float(np.median(f)) for name, f in minflt.items()})
    return {name: float(np.median(ts)) for name, ts in times.items()}


def add_malloc_arg(ap) -> None:
    ap.add_argument("--malloc", default="keep", choices=["keep", "default"],
                    help="keep: glibc keeps freed memory (viper_jax.host_memory); default: glibc as it is")


def apply_malloc(mode: str) -> None:
    """Before anything computes: `keep` makes glibc keep freed memory (exits if it cannot)."""
    from viper_jax.host_memory import keep_freed_host_memory

    if mode == "keep" and not keep_freed_host_memory():
        raise SystemExit("--malloc keep: the malloc options did not take effect (see the warning above); "
                         "use --malloc default")


def describe_machine() -> str:
    """Device, cores, CPU model and the glibc malloc tunables in force (see the README on huge pages)."""
    import platform

    import jax

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores ({model}), "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")


def train_flops(config: dict, batch: int, seq: int, patches_per_row: int) -> float:
    """Analytic forward+backward FLOPs (3 x forward) of one step: matmuls with parameters, attention
    scores and values, the vision tower and merger. XLA's cost analysis counts a scanned layer once, so
    it cannot be used for a scanned model."""
    t, v = config["text_config"], config["vision_config"]
    d, hd = t["hidden_size"], t["hidden_size"] // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    layer = d * d * 2 + 2 * d * kv + 3 * d * t["intermediate_size"]
    text = 2 * batch * seq * (t["num_hidden_layers"] * layer + d * t["vocab_size"])
    text += t["num_hidden_layers"] * 4 * batch * seq * seq * d  # QK^T and PV over the full T x T
    dv = v["hidden_size"]
    block = 3 * dv * dv + dv * dv + 3 * dv * v["intermediate_size"]
    n = batch * patches_per_row
    vision = 2 * n * (v["depth"] * block + 1176 * dv)
    window = (v["window_size"] // v["patch_size"]) ** 2
    full_blocks = len(v["fullatt_block_indexes"])
    vision += 4 * n * dv * ((v["depth"] - full_blocks) * window + full_blocks * patches_per_row)
    vision += 2 * (n // 4) * (16 * dv * dv + 4 * dv * v["out_hidden_size"])
    return 3.0 * (text + vision)
