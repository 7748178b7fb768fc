"""Each training stage's data: its pipeline (this process's share of rl.prompts_per_step from the stage's
globs), and the checks that refuse a stage without data or with records of the other stage's task, before
anything slow starts. data_pipeline, shared with `viper sft`, names the config key to fix when the globs
find no records."""

from __future__ import annotations

from typing import Any

import jax
from ml_collections import ConfigDict

from viper_common import records
from viper_jax.train.config import ConfigError


def stage_data_config(config: ConfigDict, name: str, index: int) -> ConfigDict:
    data = ConfigDict(config.data.to_dict())
    data.shard_globs = tuple(config.stages[name].data_globs)
    # rl.prompts_per_step is the global batch: each process reads its share of it (its own records).
    data.batch_size = int(config.rl.prompts_per_step) // jax.process_count()
    data.seed = int(config.data.seed) + index  # each stage its own permutation
    return data


def check_stage_data(config: ConfigDict) -> None:
    """Every stage's globs must match files before anything slow starts (loading, compiling)."""
    from viper_jax.data.pipeline import resolve_shards

    import grain

    for name in config.stage_order:
        try:
            paths = resolve_shards(tuple(config.stages[name].data_globs))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"stage {name!r} has no data: {e} (config stages.{name}.data_globs)") from None
        source = grain.sources.ArrayRecordDataSource(paths)
        if len(source) == 0:
            raise ConfigError(f"stage {name!r} has no data: its {len(paths)} shard(s) hold no records "
                              f"(config stages.{name}.data_globs)")
        try:  # the first record's task: a stage pointed at the other stage's data fails now, not after loading
            first = records.decode(bytes(source[0]))
        except records.RecordError:
            continue  # a bad record is the pipeline's to count and skip
        stage_check(name, config.stages[name].task, {"id": [first.id], "task": [first.task]})


def stage_buckets(config: ConfigDict, tokenizer: Any) -> tuple[int, ...]:
    """The prompt buckets when data.auto_buckets > 0 (data/auto_buckets.py): one set chosen over every stage's
    records, so the rollout and both stages share their compiled shapes, under max(data.length_buckets). The
    batch simulated is the one each process pads: its share of rl.prompts_per_step."""
    import numpy as np

    from viper_jax.data.auto_buckets import choose_buckets, sample_prompt_lengths
    from viper_jax.data.pipeline import resolve_shards

    data = config.data
    lengths = np.concatenate([sample_prompt_lengths(resolve_shards(tuple(config.stages[name].data_globs)), tokenizer,
                                                    data, int(data.auto_buckets_sample))
                              for name in config.stage_order])
    return choose_buckets(lengths, int(config.rl.prompts_per_step) // jax.process_count(),
                          max(int(b) for b in data.length_buckets), int(data.auto_buckets),
                          int(data.auto_buckets_multiple))


def make_stage_pipeline(config: ConfigDict, name: str, tokenizer: Any, index: int) -> Any:
    """The stage's DataPipeline; a glob matching nothing or shards without records name the stage."""
    return data_pipeline(stage_data_config(config, name, index), tokenizer,
                         f"stage {name!r} has no data (config stages.{name}.data_globs)")


def data_pipeline(data_config: ConfigDict, tokenizer: Any, where: str, **kwargs: Any) -> Any:
    """make_pipeline(data_config, tokenizer, **kwargs) for a trainer (`viper train`'s stages, `viper sft`);
    a glob matching nothing or shards without records are a ConfigError that starts with `where` (which
    config key to fix)."""
    from viper_jax.data import make_pipeline

    try:
        return make_pipeline(data_config, tokenizer, **kwargs)
    except FileNotFoundError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        if "no records" in str(e):
            raise ConfigError(f"{where}: {e}") from None
        raise


def stage_check(name: str, task: str, batch: dict[str, Any]) -> None:
    """A stage trains on its own task only (the paper: stages run in sequence, never mixed)."""
    for rid, t in zip(batch["id"], batch["task"]):
        if t != task:
            raise ConfigError(f"stage {name!r} (task {task!r}) read record {rid!r} of task {t!r}: "
                              f"its data_globs must hold {task} records only")
