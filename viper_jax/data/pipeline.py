"""The Grain input pipeline: ArrayRecord shards -> shuffled, repeated, per-process sharded, processed,
bad-record-filtered, bucket-padded batches, with an exactly restorable iterator state.

Graph (Grain MapDataset until the filter, so every step before it is index-addressable):

    ArrayRecordDataSource(sorted shard globs)
      [process_index::process_count]      per-host shard, taken before shuffling
      .shuffle(seed).repeat(num_epochs)   Grain reseeds the permutation per epoch (seed + epoch)
      .map(RecordProcessor)               -> Example | Skipped  (never raises, never drops: 1 in, 1 out)
      .to_iter_dataset(ReadOptions)       threads in this process
      .mp_prefetch(workers)               optional worker processes
      _SkipFilter                         main process: counts/logs Skipped, enforces the skip fraction
      .batch(batch_size, Collator)        left-pad to length buckets, concatenate pixels

Why the filter is ours and sits after the workers: counters kept in worker processes would never
reach the trainer, and Grain's `filter` keeps no counts. The filter's state (the counts) is saved
with its parent's, so a restored iterator resumes at the exact record and with the exact counts.

Only `make_pipeline` touches jax (for the default process index/count), lazily.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import grain

from viper_common import prompts as prompts_lib
from viper_jax.data.processing import Collator, RecordProcessor, Skipped, make_image_processor

logger = logging.getLogger(__name__)


class TooManySkippedError(RuntimeError):
    """More records were bad than `max_skip_fraction` allows; the message carries the counts."""


class SkipStats:
    """Counts of records seen by the filter and skipped per reason (for logging and checkpoints)."""

    def __init__(self) -> None:
        self.seen = 0
        self.skipped: collections.Counter[str] = collections.Counter()

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def fraction(self) -> float:
        return self.num_skipped / self.seen if self.seen else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(sorted(self.skipped.items()))}

    def load(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})

    def __repr__(self) -> str:
        return f"SkipStats(seen={self.seen}, skipped={dict(self.skipped)})"


class _SkipFilterIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, stats: SkipStats, max_fraction: float, min_seen: int):
        super().__init__(parent)
        self._stats_out = stats
        self._max_fraction = max_fraction
        self._min_seen = min_seen

    def __next__(self) -> Any:
        stats = self._stats_out
        while True:
            element = next(self._parent)  # StopIteration ends the epoch loop / dataset as usual
            stats.seen += 1
            if not isinstance(element, Skipped):
                return element
            stats.skipped[element.reason] += 1
            logger.warning("skipping record %r [%s]: %s", element.record_id, element.reason, element.message)
            if stats.seen >= self._min_seen and stats.fraction > self._max_fraction:
                raise TooManySkippedError(
                    f"{stats.num_skipped} of {stats.seen} records skipped ({stats.fraction:.1%} > "
                    f"max_skip_fraction {self._max_fraction:.1%}); by reason: {dict(stats.skipped)}")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skip_stats": self._stats_out.as_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._stats_out.load(state["skip_stats"])


class _SkipFilterIterDataset(grain.IterDataset):
    """Drops `Skipped` elements, counting them into `stats` (shared: one live iterator per pipeline)."""

    def __init__(self, parent: grain.IterDataset, stats: SkipStats, max_fraction: float, min_seen: int):
        super().__init__(parent)
        self.stats = stats
        self._max_fraction = max_fraction
        self._min_seen = min_seen

    def __iter__(self) -> _SkipFilterIterator:
        self.stats.load({"seen": 0, "skipped": {}})  # a new iterator starts from scratch, counts too
        return _SkipFilterIterator(self._parent.__iter__(), self.stats, self._max_fraction, self._min_seen)


def resolve_shards(globs: str | Sequence[str]) -> list[str]:
    """Each glob expanded and sorted (a stable order is part of the shuffle's determinism)."""
    globs = [globs] if isinstance(globs, (str, os.PathLike)) else list(globs)
    if not globs:
        raise ValueError("no shard globs given")
    paths: list[str] = []
    for pattern in globs:
        matches = sorted(glob.glob(os.fspath(pattern)))
        if not matches:
            raise FileNotFoundError(f"shard glob {pattern!r} matches no file")
        paths.extend(m for m in matches if m not in paths)
    return paths


def _open_shards(paths: list[str]) -> Any:
    """Grain's source over the shards. ArrayRecord's error for a damaged shard (cut short, empty, not an
    ArrayRecord file) is a RuntimeError that names no file, sometimes with no message at all: each shard is
    then opened alone to name the one at fault."""
    try:
        return grain.sources.ArrayRecordDataSource(paths)
    except RuntimeError as e:
        from array_record.python.array_record_module import ArrayRecordReader

        for path in paths:
            try:
                ArrayRecordReader(path).close()
            except RuntimeError as bad:
                reason = " ".join(str(bad).split()) or "its index or footer does not read"
                raise ValueError(f"record shard {path} is damaged ({reason}): it is cut short or not an "
                                 f"ArrayRecord file; rewrite it or leave it out of the shard globs") from None
        raise ValueError(f"record shards {paths} do not open: {e}") from e


class DataPipeline:
    """An iterator of batches (dicts of NumPy arrays; see `Collator`) with checkpointable state.

    `get_state()` returns a JSON-serialisable dict; `set_state()` on a pipeline built with the same
    config and shards continues with exactly the batches the original would have produced next.
    `stats` holds the skip counters of the live iterator (restored by set_state too).
    """

    def __init__(self, dataset: grain.IterDataset, stats: SkipStats, paths: list[str], num_records: int,
                 process_index: int, process_count: int):
        self.dataset = dataset
        self.stats = stats
        self.paths = paths
        self.num_records = num_records  # records in this process's shard, per epoch
        self.process_index = process_index
        self.process_count = process_count
        self._iterator: grain.DatasetIterator | None = None

    @property
    def iterator(self) -> grain.DatasetIterator:
        if self._iterator is None:
            self._iterator = iter(self.dataset)
        return self._iterator

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self.iterator)

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)

    def close(self) -> None:
        """Stops worker processes (if any). The pipeline can be iterated again afterwards, from scratch."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def make_pipeline(config: Any, tokenizer: Any, *, process_index: int | None = None,
                  process_count: int | None = None, image_processor: Any = None,
                  processor_cls: Callable[..., Any] = RecordProcessor,
                  collator_cls: Callable[..., Any] = Collator) -> DataPipeline:
    """Builds the pipeline from `get_data_config()`-shaped `config`.

    processor_cls / collator_cls: what turns a record into an element and elements into a batch, built
    with RecordProcessor's / Collator's arguments (`viper sft` passes subclasses that add the answer).

    process_index/process_count default to jax.process_index()/process_count(); process i reads records
    i, i+n, i+2n, ... of the concatenated shards (every record on exactly one process; with a record
    count not divisible by n the shards differ by one record).
    """
    if process_index is None or process_count is None:
        import jax  # only here: the rest of the data package does not need jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    buckets = tuple(sorted(int(b) for b in config.length_buckets))
    if not buckets:
        raise ValueError("length_buckets is empty")
    overrides = config.prompts.to_dict() if hasattr(config.prompts, "to_dict") else dict(config.prompts or {})
    task_prompts = prompts_lib.merged(prompts_lib.TRAINING_PROMPTS, overrides)
    image_processor = image_processor or make_image_processor(config.min_pixels, config.max_pixels)
    processor = processor_cls(tokenizer, image_processor, task_prompts, max_length=buckets[-1])
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token")
    collator = collator_cls(length_buckets=buckets, pad_id=int(tokenizer.pad_token_id), image_id=processor.image_id,
                        video_id=processor.video_id,
                        patch_buckets=tuple(sorted(int(b) for b in config.patch_buckets)))

    paths = resolve_shards(config.shard_globs)
    ds = grain.MapDataset.source(_open_shards(paths))
    ds = ds[process_index::process_count]
    num_records = len(ds)
    if num_records == 0:
        raise ValueError(f"process {process_index}/{process_count} got no records from {len(paths)} shard(s)")
    if config.shuffle:
        ds = ds.shuffle(seed=int(config.seed))
    if config.num_epochs is None or config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)  # shuffle below repeat: a new permutation per epoch
    ds = ds.map(processor)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(config.read_threads),
                                              prefetch_buffer_size=int(config.read_prefetch)))
    if config.worker_count > 0:
        # Grain 0.2.18's worker start reads an absl flag and raises UnparsedFlagAccessError in programs that
        # do not run absl.app (google/grain#1355, fixed upstream by #1362). Marking the flags parsed when
        # nobody has parsed them leaves every flag at its default, which is what they would read anyway.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(config.worker_count),
                                                         per_worker_buffer_size=int(config.worker_buffer_size)))
    stats = SkipStats()
    it = _SkipFilterIterDataset(it, stats, float(config.max_skip_fraction), int(config.min_seen_for_skip_check))
    it = it.batch(int(config.batch_size), drop_remainder=bool(config.drop_remainder), batch_fn=collator)
    return DataPipeline(it, stats, paths, num_records, process_index, process_count)
