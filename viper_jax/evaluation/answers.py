"""Answer extraction from free-text responses, and accuracy (overall and per category).

Multiple choice, in order (the first rule that gives an answer wins):
  1. the whole response is a letter: "B", "(B)", "B.", "**B**", "[B]"
  2. an explicit statement: "Answer: B", "The answer is (b)", "the correct option is B."
  3. a leading letter with a separator: "B. a dog", "(B) a dog", "B) dog", "B: dog"
  4. the response equals one option's text ("a dog", "A dog.")
  5. exactly one option letter stands alone as a word (uppercase; a capital "A" is ignored in a response
     longer than three words, where it is far more likely the article: VLMEvalKit's rule)
  6. the response contains exactly one option's text (an option whose text lies inside another matched
     option's text does not count: "dark red" beats "red")
  otherwise unparseable (None): scored wrong, and counted separately.
Yes/no: the first word; "the answer is yes"; otherwise exactly one of the words yes/no anywhere.
Matching is case-insensitive except for rule 5's bare letters.
A response in the reasoning format (`<think>...</think><answer>...</answer>`, what ViPER trains) is judged on
its answer block alone, so a letter or "yes" in the reasoning cannot decide; a response whose answer block
is never closed is judged on what follows `<answer>`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

from viper_jax.rl.reward import DEFAULT_FORMAT_REGEX

_LETTER_ONLY = re.compile(r"^[\s*_`'\"\[(]*([A-Za-z])[\s*_`'\"\])]*[.:)]?[\s*_`'\"]*$")
# Keywords match in any case; a bare letter after them must be a capital (so "the answer is a dog" is not
# "A"), while a bracketed letter or one that ends the sentence may be lowercase.
_STATEMENT = re.compile(
    r"(?i:\b(?:answer|option|choice)(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)\s*[:：]?\s*"
    r"(?i:option\s+|choice\s+)?[*_`'\"]*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])\b|([a-z])(?=[.)]|\s*$))")
_LEADING = re.compile(r"^[\s*_`'\"]*(?:\(([A-Za-z])\)|([A-Z])[.):])(?:\s|$)")
_WORD = re.compile(r"[a-z0-9]+")


def _norm(text: str) -> str:
    """Lowercase words joined by single spaces (punctuation dropped)."""
    return " ".join(_WORD.findall(text.lower()))


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


def extract_choice(response: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text response picks, or None when it cannot be told."""
    text = response.strip()
    letters = set(options)

    def ok(*groups: str | None) -> str | None:
        letter = next((g for g in groups if g), None)
        return letter.upper() if letter and letter.upper() in letters else None

    m = _LETTER_ONLY.match(text)
    if m and ok(m.group(1)):
        return ok(m.group(1))
    for m in _STATEMENT.finditer(text):
        if ok(*m.groups()):
            return ok(*m.groups())
    m = _LEADING.match(text)
    if m and ok(*m.groups()):
        return ok(*m.groups())
    norm = _norm(text)
    texts = {k: _norm(v) for k, v in options.items()}
    equal = [k for k, v in texts.items() if v and v == norm]
    if len(equal) == 1:
        return equal[0]
    words = re.findall(r"[A-Za-z]+", text)
    standalone = {w for w in words if len(w) == 1 and w.isupper() and w in letters}
    if len(words) > 3:
        standalone.discard("A")
    if len(standalone) == 1:
        return standalone.pop()
    inside = [k for k, v in texts.items() if _contains(norm, v)]
    inside = [k for k in inside if not any(j != k and texts[k] != texts[j] and _contains(texts[j], texts[k])
                                           for j in inside)]
    return inside[0] if len(inside) == 1 else None


_YES_NO_STATEMENT = re.compile(r"\banswer\s*(?:is|:)?\s*[*_`'\"]*(yes|no)\b", re.IGNORECASE)


def extract_yes_no(response: str) -> str | None:
    """"yes", "no", or None."""
    words = _norm(response).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    m = _YES_NO_STATEMENT.search(response)
    if m:
        return m.group(1).lower()
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)


def answer_text(response: str) -> str:
    """The contents of the last `<answer>` block when the response has one, else the whole response."""
    blocks = _ANSWER_BLOCK.findall(response)
    return blocks[-1] if blocks else response


def extract(response: str, options: dict[str, str]) -> str | None:
    """Multiple choice when there are options, yes/no otherwise (on the answer block, if any)."""
    text = answer_text(response)
    return extract_choice(text, options) if options else extract_yes_no(text)


_REASONING_FORMAT = re.compile(DEFAULT_FORMAT_REGEX, re.DOTALL)


def well_formed(response: str) -> bool:
    """The response is `<think>...</think><answer>...</answer>`: the format ViPER's reward asks for."""
    return _REASONING_FORMAT.fullmatch(response) is not None


def chance(options: dict[str, str]) -> float:
    """Accuracy of a uniform guess: 1 / number of options, 1/2 for yes/no."""
    return 1.0 / len(options) if options else 0.5


@dataclasses.dataclass
class Accuracy:
    total: int = 0
    correct: int = 0
    unparsed: int = 0
    formatted: int = 0  # responses in the reasoning format
    chance_sum: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, correct: bool, parsed: bool, formatted: bool = False, chance_level: float = 0.0) -> None:
        self.total += 1
        self.correct += int(correct)
        self.unparsed += int(not parsed)
        self.formatted += int(formatted)
        self.chance_sum += chance_level

    def to_dict(self) -> dict[str, Any]:
        n = max(self.total, 1)
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "unparsed": self.unparsed,
                "format_rate": self.formatted / n, "chance": self.chance_sum / n}


def score(predictions: Iterable[dict[str, Any]]) -> tuple[Accuracy, dict[str, Accuracy]]:
    """Overall and per-category accuracy of predictions carrying `category`, `extracted`, `correct` (and
    optionally `formatted` and `chance`). An unparseable response (extracted None) is wrong and counted in
    `unparsed`; `chance` averages the rows' uniform-guess accuracy, `format_rate` the reasoning format."""
    overall, per = Accuracy(), {}
    per: dict[str, Accuracy]
    for p in predictions:
        args = (bool(p["correct"]), p["extracted"] is not None, bool(p.get("formatted")), float(p.get("chance", 0.0)))
        overall.add(*args)
        per.setdefault(p["category"], Accuracy()).add(*args)
    return overall, dict(sorted(per.items()))
