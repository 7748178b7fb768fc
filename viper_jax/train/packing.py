"""Sequence packing for the GRPO update (`rl.packing`): the update runs on real tokens only.

The padded update (grpo_batch.update_inputs) gives every response a row of prompt bucket + response width,
whatever its real length. Packed, each response's sequence (its prompt's real tokens, then its counted
response tokens) is a segment of a row of fixed length L, several segments a row:

  ids / prompt_src [rows, L]  response token ids / where a prompt token's embedding comes from (the
                              micro-batch's prompts are embedded once, vision included, as padded: prompt p's
                              column c is p * Tp + c; -1 at response tokens and padding)
  segment_ids [rows, L]       1, 2, ... per segment, 0 = padding: attention is causal within a segment
  positions [3, rows, L]      each segment's own MRoPE positions: those of its padded row (update_inputs'),
                              real columns only, so every token sits where the sampler saw it
  pred_index [K]              flat index (row * L + column) of each position that predicts a response token
                              (prompt's last token, then response token i - 1), segment after segment;
                              K = response width x max(rows, what the tokens need), the rest index 0, mask 0
  targets / resp_mask / old_logp / advantages / seq_tokens [1, K]
                              per predicted token: the token, its loss mask, old log-prob, its response's
                              advantage and that response's counted token count (seq-mean-token-mean). The
                              lm_head runs on these K positions only, not on prompt tokens and padding.

Responses whose mask is all zero (groups dropped by rl.drop_zero_spread) add nothing to the loss or its
gradient, so they are left out. Micro-batches are cut by a token budget (verl's dynamic batch size): prompts
are taken in order while their sequences fit `max_rows` rows of L (first-fit decreasing), the row count
rounded up to an eighth of the budget (few distinct shapes to compile). Denominators stay the minibatch's (token
and sequence counts), so the summed gradients equal the padded update's whatever the cut.

Several JAX processes (grpo_multihost.MultiProcess.agree_packed): each process packs its own prompts of the
minibatch as above, into rows of the agreed prompt width + response width, under its share of the budget
(rl.pack_tokens, like rl.micro_batch_prompts, counts over all processes). Their cuts differ with their lengths,
but every jitted call is collective, so the processes then allgather their plans (micro-batches per minibatch;
each one's prompt range, rows and K), take the maxima, and grow each micro-batch to them (`pad_packed`: prompts of
pad tokens, rows of segment 0, slots of mask 0, all multiples of the process's batch shards); a process with
fewer micro-batches runs empty ones. The global arrays are the processes' blocks in block order: prompt_src and
pred_index shifted by the block's offset, the [1, K] arrays and positions blocked on axis 1 (MicroBatch.axis),
images as in the padded multi-process path (each process's pixel block, block_vision_inputs over every
process's grids of its micro-batch). Padding adds nothing to loss or gradient and the denominators are global
sums, so the gradient is the unpacked multi-process one (tests/test_train_multiprocess.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from viper_jax.train.grpo_batch import RolloutBatch, update_inputs


@dataclasses.dataclass
class MicroBatch:
    """One forward/backward pass: the jitted update's inputs and host copies of what the step reads back."""

    inputs: dict[str, Any]  # update_inputs' dict (padded) or pack_micro's (packed)
    mask: np.ndarray        # this process's loss mask in the inputs' layout
    old_logp: np.ndarray    # the rollout's log-probs in the same layout
    seqs: int               # responses with at least one counted token
    processed: int          # token slots the forward runs on, padding excluded for prompts (the metric)
    prompts: tuple[int, int] = (0, 0)  # its prompts [a, b) of the batch (several processes: their images)
    axis: int = 0           # the process-block axis of mask / old_logp: rows (padded [R, N]) or 1 (packed [1, K])

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def padded_micro(batch: RolloutBatch, start: int, stop: int, inputs: dict[str, Any]) -> MicroBatch:
    """The padded micro-batch of prompts [start, stop) (`inputs` from update_inputs or its multi-process twin)."""
    g = batch.group_size
    mask = batch.resp_mask[start * g:stop * g]
    return MicroBatch(inputs, mask, batch.old_logp[start * g:stop * g], int((mask.sum(axis=1) > 0).sum()),
                      int(batch.tokens[start * g:stop * g].size + batch.prompt_mask[start:stop].sum() * g))


def response_width(resp_mask: np.ndarray, bucket: int) -> int:
    """Columns of the response span to keep: the longest counted response rounded up to bucket * 2^k (few
    distinct shapes), at most the full width. bucket <= 0 keeps the full width (max_new_tokens)."""
    n = resp_mask.shape[1]
    if bucket <= 0:
        return n
    nz = resp_mask != 0
    longest = int((n - np.argmax(nz[:, ::-1], axis=1))[nz.any(axis=1)].max(initial=0))
    width = bucket
    while width < longest:
        width *= 2
    return min(width, n)


def trim_responses(batch: RolloutBatch, width: int) -> RolloutBatch:
    """The batch with response columns [width, N) dropped (nothing counted lives there: causal attention
    means they never change an earlier token)."""
    return dataclasses.replace(batch, tokens=batch.tokens[:, :width], resp_mask=batch.resp_mask[:, :width],
                               old_logp=batch.old_logp[:, :width])


def _counted_lengths(resp_mask: np.ndarray) -> np.ndarray:
    """[R]: response tokens up to and including the last counted one (0 for a row that counts none)."""
    nz = resp_mask != 0
    return np.where(nz.any(axis=1), resp_mask.shape[1] - np.argmax(nz[:, ::-1], axis=1), 0)


def _sequence_lengths(batch: RolloutBatch, start: int, stop: int) -> np.ndarray:
    """[(stop - start) * G]: packed length of each response row (0: left out)."""
    g = batch.group_size
    resp = _counted_lengths(batch.resp_mask[start * g:stop * g])
    prompt = np.repeat(batch.prompt_mask[start:stop].sum(axis=1), g)
    return np.where(resp > 0, prompt + resp, 0)


def first_fit(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Indices of the non-zero `lengths` in rows of capacity row_len, first-fit decreasing (stable ties)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(np.flatnonzero(lengths).tolist(), key=lambda i: -int(lengths[i])):
        if lengths[i] > row_len:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a packed row of {row_len}")
        slot = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(row_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= int(lengths[i])
    return rows


def row_bucket(needed: int, max_rows: int, multiple: int = 1) -> int:
    """Rows a micro-batch is padded to: a multiple of an eighth of the budget's rows (at most 8 shapes to
    compile; powers of two wasted up to half the rows, e.g. 16 for 9), capped at the budget (or at `needed` when
    one prompt's group alone exceeds it), then rounded up to a multiple of the mesh's batch shards (every
    device takes an equal share of the rows)."""
    granule = max(1, max_rows // 8)
    rows = min(-(-needed // granule) * granule, max(max_rows, needed))
    return -(-rows // multiple) * multiple


def predicted_slots(rows: int, tokens: int, width: int) -> int:
    """K, the predicted-token slots of a packed micro-batch of `rows` rows holding `tokens` response tokens: a
    multiple of the response width, tied to the row count (no extra shape to compile) unless short prompts
    let the rows hold more response tokens than that."""
    return width * max(rows, -(-tokens // width))


def cut_prompts(lengths: np.ndarray, row_len: int, max_rows: int) -> list[tuple[int, int]]:
    """A minibatch's prompts as micro-batches [a, b) (indices into `lengths`, [prompts, G] packed lengths):
    prompts taken in order while their sequences fit `max_rows` rows of row_len, at least one a micro-batch
    (even if its group alone needs more rows than the budget)."""
    cuts, a, stop = [], 0, len(lengths)
    while a < stop:
        b = a + 1
        while b < stop and len(first_fit(lengths[a:b + 1].reshape(-1), row_len)) <= max_rows:
            b += 1
        cuts.append((a, b))
        a = b
    return cuts


# The per-predicted-token arrays [1, K] of a packed micro-batch (pred_index [K] besides).
PER_TOKEN = (("targets", np.int32), ("resp_mask", np.float32), ("old_logp", np.float32), ("advantages", np.float32),
             ("seq_tokens", np.float32))


def _padding(rows: int, row_len: int, slots: int) -> dict[str, np.ndarray]:
    """pack_micro's arrays holding nothing: rows of segment 0 (prompt_src -1), predicted slots of index 0, mask 0."""
    shape = (rows, row_len)
    out = {name: np.zeros(shape, np.int32) for name in ("ids", "segment_ids")}
    out.update({name: np.zeros((1, slots), dt) for name, dt in PER_TOKEN})
    out["pred_index"] = np.zeros(slots, np.int32)
    out["prompt_src"] = np.full(shape, -1, np.int32)
    out["positions"] = np.zeros((3, *shape), np.int32)
    return out


def pack_micro(inputs: dict[str, Any], group_size: int, row_len: int, max_rows: int, multiple: int = 1) -> MicroBatch:
    """update_inputs' padded dict of some prompts -> their packed MicroBatch (layout: module docstring)."""
    ids, pmask, resp = inputs["prompt_ids"], inputs["prompt_mask"], inputs["resp_mask"]
    tp = ids.shape[1]
    counted = _counted_lengths(resp)
    cols = [np.flatnonzero(m) for m in pmask]
    lengths = np.asarray([len(cols[r // group_size]) + counted[r] if counted[r] else 0 for r in range(len(resp))])
    layout = first_fit(lengths, row_len)
    rows = row_bucket(len(layout), max_rows, multiple)
    out = _padding(rows, row_len, predicted_slots(rows, int(counted.sum()), resp.shape[1]))
    done = 0  # predicted tokens written
    for row, members in enumerate(layout):
        at = 0
        for segment, r in enumerate(members, start=1):
            c, n = cols[r // group_size], int(counted[r])
            lp, end = len(c), at + len(c) + n
            out["prompt_src"][row, at:at + lp] = (r // group_size) * tp + c
            out["ids"][row, at + lp:end] = inputs["tokens"][r, :n]
            out["segment_ids"][row, at:end] = segment
            out["positions"][:, row, at:end] = np.concatenate(
                [inputs["positions"][:, r, c], inputs["positions"][:, r, tp:tp + n]], axis=1)
            pred = slice(done, done + n)
            out["pred_index"][pred] = row * row_len + np.arange(at + lp - 1, end - 1)  # prompt's last, then 0..n-2
            out["targets"][0, pred] = inputs["tokens"][r, :n]
            out["resp_mask"][0, pred] = resp[r, :n]
            out["old_logp"][0, pred] = inputs["old_logp"][r, :n]
            out["advantages"][0, pred] = inputs["advantages"][r]
            out["seq_tokens"][0, pred] = resp[r].sum()
            at, done = end, done + n
    packed = {k: v for k, v in inputs.items() if k in ("prompt_ids", "pixel_values", "vision_inputs")}
    packed.update(out)
    return MicroBatch(packed, out["resp_mask"], out["old_logp"].copy(), int((counted > 0).sum()),
                      int(lengths.sum()), axis=1)


def pad_packed(micro: MicroBatch, prompts: int, rows: int, slots: int, pad_id: int, keep: bool = True) -> MicroBatch:
    """A packed micro-batch grown to `prompts` prompts, `rows` rows and `slots` predicted slots (several
    processes make theirs the same shape, so the jitted collectives line up), or, keep=False, one of that
    shape holding nothing (a process with fewer micro-batches). Same loss and gradients: the added prompts
    (pad_id, no image token) are embedded but never referenced, added rows are segment 0 (they attend
    only to each other, prompt_src -1) and added slots have mask 0."""
    x = micro.inputs
    out = _padding(rows, x["ids"].shape[1], slots)
    out["prompt_ids"] = np.full((prompts, x["prompt_ids"].shape[1]), pad_id, np.int32)
    if not keep:
        return MicroBatch(out, out["resp_mask"], out["old_logp"].copy(), 0, 0, axis=1)
    out["prompt_ids"][:len(x["prompt_ids"])] = x["prompt_ids"]
    r, k = x["ids"].shape[0], x["pred_index"].shape[0]
    for name in ("ids", "segment_ids", "prompt_src"):
        out[name][:r] = x[name]
    out["positions"][:, :r] = x["positions"]
    out["pred_index"][:k] = x["pred_index"]
    for name, _ in PER_TOKEN:
        out[name][:, :k] = x[name]
    out.update({name: x[name] for name in ("pixel_values", "vision_inputs") if name in x})
    return dataclasses.replace(micro, inputs=out, mask=out["resp_mask"], old_logp=out["old_logp"].copy())


def pack_minibatch(batch: RolloutBatch, start: int, stop: int, config: Any, max_rows: int, multiple: int = 1,
                   inputs: Callable[..., dict[str, Any]] = update_inputs) -> list[MicroBatch]:
    """Prompts [start, stop) (one minibatch) as packed micro-batches of at most `max_rows` rows of prompt
    bucket + response width tokens (the padded row width, so any sequence fits), prompts in order.
    `inputs(batch, a, b, config)`: update_inputs' dict of prompts [a, b) (a process's own rows, when several)."""
    g, row_len = batch.group_size, batch.prompt_ids.shape[1] + batch.tokens.shape[1]
    lengths = _sequence_lengths(batch, start, stop).reshape(-1, g)
    return [dataclasses.replace(pack_micro(inputs(batch, start + a, start + b, config), g, row_len, max_rows, multiple),
                                prompts=(start + a, start + b))
            for a, b in cut_prompts(lengths, row_len, max_rows)]


def packed_forward(model: Any, micro: dict[str, Any], temperature: float, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies [1, K] of the packed predicted tokens (pred_index's positions)."""
    from viper_jax.train.grpo_step import response_logprobs  # grpo_step imports this module

    # Prompts embedded once each (vision tower included), as the padded path does; every segment then takes
    # its own prompt's rows, so each one's vision tokens land in that segment, and the vision gradient is
    # the sum over the group as with repeated embeddings.
    prompt = model.embed(micro["prompt_ids"], micro.get("pixel_values"), micro.get("vision_inputs"))
    src = micro["prompt_src"]
    flat = prompt.reshape(-1, prompt.shape[-1])
    x = jnp.where((src >= 0)[..., None], flat[jnp.maximum(src, 0)], model.language_model.embed(micro["ids"]))
    hidden, _ = model.language_model(x, micro["positions"], segment_ids=micro["segment_ids"])
    predicting = hidden.reshape(-1, hidden.shape[-1])[micro["pred_index"]][None]  # [1, K, D]
    return response_logprobs(model, predicting, micro["targets"], temperature, chunk)
