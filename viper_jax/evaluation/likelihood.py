"""Option scoring by likelihood: which of a question's options the model finds most likely as its answer.

Generation-based scoring (answers.py) asks the model to write its choice and parses it; a model that reads the
image but writes an answer outside the options, or cannot bind an option to its letter, scores as a guess.
Here each candidate answer is scored by the model's log-probability as the contents of its own answer block,
teacher-forced, and the most likely one is the choice (lm-evaluation-harness's `multiple_choice`, and what
lmms-eval does for many multiple-choice benchmarks):

    prompt + the model's own greedy response up to and including "<answer>" + candidate + "</answer>"

The prefix is the model's response (its think) so that the candidate is scored where the model itself would
write its answer; a response without "<answer>" gets its think (or an empty one) closed and "<answer>" added
(counted as `forced_prefix`). Candidates are the option texts ("text") or the option letters ("letter");
yes/no questions always score "Yes." against "No.". The score is the summed log-probability of the candidate's
tokens and of "</answer>" (which marks the end, so a candidate that is only the start of a likelier one does
not win); ties go to the first option. Candidates of one row share one forward pass (right-padded: causal
attention keeps the padding out of every scored position).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

OPTION_FORMS = ("text", "letter")
_YES_NO = {"yes": "Yes.", "no": "No."}


@dataclasses.dataclass(frozen=True)
class Scored:
    choice: str                 # an option letter, or "yes" / "no"
    logprobs: dict[str, float]  # per choice
    forced_prefix: bool         # the response had no "<answer>": the prefix was completed


def answer_prefix(response: str) -> tuple[str, bool]:
    """The model's response up to and including "<answer>", and whether it had to be completed."""
    cut = response.find("<answer>")
    if cut >= 0:
        return response[:cut + len("<answer>")], False
    end = response.find("</think>")
    think = response[:end + len("</think>")] if end >= 0 and response.startswith("<think>") else "<think></think>"
    return think + "<answer>", True


def candidates(options: dict[str, str], form: str) -> dict[str, str]:
    """choice -> the text scored inside the answer block."""
    if form not in OPTION_FORMS:
        raise ValueError(f"option form must be one of {OPTION_FORMS}, got {form!r}")
    if not options:
        return dict(_YES_NO)
    return {k: (v if form == "text" else k) for k, v in options.items()}


_WIDTH_MULTIPLE = 32  # sequence widths are padded to a multiple: a few compiled programs for a whole benchmark


@functools.cache  # one jitted function for the process (it compiles once per shape)
def _tail_logprobs_fn():
    from flax import nnx

    from viper_jax.rl.grpo_loss import token_logprobs

    @nnx.jit
    def tail_logprobs(model: Any, ids: Any, pixels: Any, positions: Any, vision_inputs: Any) -> Any:
        logits = model(ids, pixel_values=pixels, position_ids=positions, vision_inputs=vision_inputs)
        return token_logprobs(logits[:, :-1], ids[:, 1:])  # position t's logits predict token t + 1

    return tail_logprobs


def score_row(session: Any, prompt: Any, response: str, options: dict[str, str], form: str = "text") -> Scored:
    """Scores every candidate of one row (prompt: the row's `Prompt`, response: the model's greedy answer)."""
    import jax.numpy as jnp

    tok, model = session.tokenizer, session.model
    prefix, forced = answer_prefix(response)
    head = np.concatenate([prompt.input_ids, np.asarray(tok(prefix, add_special_tokens=False).input_ids)])
    cands = candidates(options, form)
    tails = [tok(text + "</answer>", add_special_tokens=False).input_ids for text in cands.values()]
    width = -(-(len(head) + max(len(t) for t in tails)) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
    ids = np.full((len(tails), width), session.pad_token_id, dtype=np.int32)
    for r, tail in enumerate(tails):
        ids[r, :len(head)] = head
        ids[r, len(head):len(head) + len(tail)] = tail
    pixels = grids = None
    if len(prompt.image_grid_thw):
        pixels = jnp.asarray(np.concatenate([prompt.pixel_values] * len(tails)))
        grids = np.concatenate([prompt.image_grid_thw] * len(tails))
    positions, vision_inputs, _ = model.prepare_inputs(ids, None, grids)
    per_token = np.asarray(_tail_logprobs_fn()(model, jnp.asarray(ids), pixels, jnp.asarray(positions), vision_inputs))
    start = len(head) - 1
    logprobs = {choice: float(per_token[r, start:start + len(tail)].sum())
                for r, (choice, tail) in enumerate(zip(cands, tails))}
    best = max(logprobs, key=lambda k: (logprobs[k], -list(cands).index(k)))
    return Scored(best, logprobs, forced)


def option_predictions(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions as scored by likelihood: `extracted` / `correct` replaced by the option choice (for
    answers.score and the reproduce report)."""
    return [{**p, "extracted": p["option_choice"], "correct": p["option_correct"]} for p in predictions]
