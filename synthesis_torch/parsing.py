"""Parsing and filtering of the synthesising VLM's free-text outputs. Pure Python (no torch).

Stage 1 corrections: the critique is split into lines, bullets/numbering are stripped, each line is split
into sentences (one correction per sentence: the reward matches sentence against sentence), and each
sentence must pass `accept_sentence`. Then exact duplicates after normalisation (case, punctuation,
whitespace) are dropped and the list is capped.

Stage 2 edit operations: each line must read `<type>: <instruction>` with a known type (synonyms such as
"colour" -> attribute, "delete" -> remove are mapped); the instruction must pass `accept_sentence`.

Strict rules (real models): a sentence has >= `min_words` words, at most `max_chars` characters, a share
of letters and spaces >= `min_alpha_ratio`, is not a heading (ends with ':') and is not a "no errors"
statement. Lenient mode (`filter.lenient`, for tiny random-init models only) accepts any non-empty line as
a sentence and any non-empty line as an operation of type "unspecified"; it exists so that gibberish still
flows through the pipeline in tests and the CPU demo, where only structure and accounting are checked.
Every dropped piece is counted by reason, so a run's report says why outputs were lost.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata
from typing import Iterable

OP_ALIASES = {
    "attribute": "attribute", "attributes": "attribute", "attribute change": "attribute",
    "color": "attribute", "colour": "attribute", "material": "attribute", "size": "attribute",
    "add": "add", "addition": "add", "insert": "add",
    "remove": "remove", "removal": "remove", "delete": "remove", "erase": "remove",
    "replace": "replace", "replacement": "replace", "swap": "replace", "substitute": "replace",
    "move": "move", "movement": "move", "reposition": "move", "relocate": "move", "position": "move",
    "count": "count", "count change": "count", "number": "count", "quantity": "count",
    "text": "text", "text change": "text", "text edit": "text",
}
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2023\u25e6>]+|\(?\d{1,3}[.):]|\(?[a-z][.)])\s+", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
# "<type>: text", "**Type** - text", "[type] - text"; a hyphen only counts as a separator with spaces
# around it, so "Add a red-haired man" is not read as type "add a red".
_OP_LINE = re.compile(r"^\W*([A-Za-z][A-Za-z ]{0,20}?)\W*?\s*(?::|\s[-\u2013\u2014]\s|[\u2013\u2014])\s*(.+)$")
_NO_ERROR = re.compile(
    r"^(?:there (?:are|were) )?no (?:other |further |obvious |significant )?"
    r"(?:errors?|mistakes?|corrections?|differences?|omissions?|issues?)\b"
    r"|\b(?:description|caption) (?:is|was) (?:accurate|correct|complete)\b"
    r"|^(?:none|n/a|nothing)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SentenceRules:
    lenient: bool = False
    min_words: int = 3
    max_chars: int = 300
    min_alpha_ratio: float = 0.7


@dataclasses.dataclass(frozen=True)
class EditOp:
    type: str  # one of config.OP_TYPES, or "unspecified" (lenient mode only)
    instruction: str

    @property
    def sentence(self) -> str:
        """The ground-truth sentence: the instruction, capitalised and ending in punctuation."""
        return as_sentence(self.instruction)


def clean_text(text: str) -> str:
    """Drops <think> blocks, keeps the <answer> body if there is one, removes control characters."""
    text = _THINK.sub("", text or "")
    answer = _ANSWER.search(text)
    if answer:
        text = answer.group(1)
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return "\n".join(" ".join(line.split()) for line in text.splitlines()).strip()


def clean_caption(text: str) -> str:
    """The caption as one paragraph (t2i prompts and the training prompt quote it inline)."""
    return " ".join(clean_text(text).split())


def normalise(sentence: str) -> str:
    """Key for de-duplication: case-folded words, punctuation and spacing ignored."""
    return " ".join(re.sub(r"[\W_]+", " ", sentence.casefold()).split())


def as_sentence(text: str) -> str:
    text = text.strip().strip("\"'`*").strip()
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    if text and text[-1] not in ".!?\"'":
        text += "."
    return text


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def strip_bullet(line: str) -> str:
    return _BULLET.sub("", line, count=1).strip().strip("*").strip()


def sentence_reject_reason(sentence: str, rules: SentenceRules) -> str | None:
    """None if `sentence` is acceptable, else a short reason key."""
    if not sentence.strip():
        return "empty"
    if rules.lenient:
        return None
    if len(sentence) > rules.max_chars:
        return "too_long"
    if len(sentence.split()) < rules.min_words:
        return "too_short"
    alpha = sum(ch.isalpha() or ch.isspace() for ch in sentence) / len(sentence)
    if alpha < rules.min_alpha_ratio:
        return "not_text"
    if sentence.rstrip().endswith(":"):
        return "heading"
    if _NO_ERROR.search(sentence):
        return "no_error_statement"
    return None


def dedupe(sentences: Iterable[str], dropped: collections.Counter | None = None) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in sentences:
        key = normalise(s) or s
        if key in seen:
            if dropped is not None:
                dropped["duplicate"] += 1
            continue
        seen.add(key)
        out.append(s)
    return out


def parse_corrections(text: str, rules: SentenceRules, max_items: int
                      ) -> tuple[list[str], collections.Counter]:
    """Correction sentences from a critique, and a counter of what was dropped and why."""
    dropped: collections.Counter = collections.Counter()
    sentences = []
    for line in clean_text(text).splitlines():
        line = strip_bullet(line)
        if not line:
            continue
        pieces = [line] if rules.lenient else split_sentences(line)
        for piece in pieces:
            reason = sentence_reject_reason(piece, rules)
            if reason:
                dropped[reason] += 1
            else:
                sentences.append(piece if rules.lenient else as_sentence(piece))
    sentences = dedupe(sentences, dropped)
    if len(sentences) > max_items:
        dropped["over_cap"] += len(sentences) - max_items
        sentences = sentences[:max_items]
    return sentences, dropped


def parse_edit_ops(text: str, rules: SentenceRules, allowed_types: Iterable[str], max_ops: int
                   ) -> tuple[list[EditOp], collections.Counter]:
    """Typed edit operations from the VLM's instruction list, and a counter of dropped lines by reason."""
    allowed = set(allowed_types)
    dropped: collections.Counter = collections.Counter()
    ops: list[EditOp] = []
    seen: set[str] = set()
    for raw in clean_text(text).splitlines():
        line = strip_bullet(raw)
        if not line:
            continue
        match = _OP_LINE.match(line)
        op_type = OP_ALIASES.get(match.group(1).strip().lower()) if match else None
        if op_type is None:
            if rules.lenient:
                op_type, instruction = "unspecified", line
            else:
                dropped["no_type" if not match else "unknown_type"] += 1
                continue
        else:
            instruction = match.group(2).strip()
            if op_type not in allowed:
                dropped["type_not_allowed"] += 1
                continue
        reason = sentence_reject_reason(instruction, rules)
        if reason:
            dropped[reason] += 1
            continue
        key = normalise(instruction) or instruction
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        ops.append(EditOp(op_type, instruction))
    if len(ops) > max_ops:
        dropped["over_cap"] += len(ops) - max_ops
        ops = ops[:max_ops]
    return ops, dropped


def refined_description(caption: str, corrections: Iterable[str]) -> str:
    """The caption followed by its corrections: stage 2's input text when the VLM does not rewrite them into
    one description (vlm.rewrite_refined off, or an unusable rewrite; kept in stage-1 provenance)."""
    return " ".join([caption.strip(), *(c.strip() for c in corrections)]).strip()


def parse_yes_no(text: str) -> bool | None:
    """True / False for an answer whose first word is yes / no (after <think> blocks and <answer> tags, case
    and punctuation ignored); None for anything else."""
    words = re.sub(r"[^\w\s]+", " ", clean_text(text)).casefold().split()
    if not words:
        return None
    return {"yes": True, "no": False}.get(words[0])
