"""Rule-based selection of "hard entities" in a refined description (stage 2). Pure Python, deterministic.

The paper selects hard entities "by heuristic rules" without publishing them; these are ours.

1. Noun phrases. The description is split into sentences and clauses (at , ; : and brackets), then into
   lower-case word tokens. A noun phrase starts at a determiner or number word (a, an, the, two, 3,
   several, ...) and extends over at most 6 following words, up to (not including) a stop word: a
   preposition, verb, conjunction or relative pronoun. "and" inside a phrase is kept only when the next
   word is an attribute word ("a red and white umbrella"). The last word is the head; the words before it
   are modifiers. Phrases whose head is a place word (left, background, image, ...) are not entities.
   A quoted string ("STOP", 'Cafe') is attached to the nearest noun phrase before it in its clause.
2. Flags and score (an entity can have several):
   - attributes: modifiers found in the colour, material, pattern, shape or size lexicons: +1 each,
     and +2 more ("multi_attribute") when there are two or more;
   - text: a quoted string in the clause, or a head/modifier that names text (sign, label, logo,
     lettering, ...): +3;
   - small: a small-size word (small, tiny, distant, ...) among the modifiers: +2;
   - relation: a spatial relation phrase (left of, next to, behind, on top of, ...) right after the
     phrase (optionally after one or two verbs such as "is sitting") or right before it: +1;
   - count: a number word above one as determiner ("two dogs", "3 cups"): +1.
3. Entities scoring below `min_score` are dropped; phrases equal after normalisation are merged (the first
   occurrence is kept); the rest are ranked by score, ties by position in the text, and the top
   `max_entities` are returned. The same text always gives the same entities.
"""

from __future__ import annotations

import dataclasses
import re

COLOURS = set("""red orange yellow green blue purple violet pink brown black white gray grey silver gold golden
beige tan cream ivory maroon navy teal turquoise cyan magenta crimson scarlet olive khaki lavender amber
bronze copper dark light pale bright colorful colourful multicolored multicoloured transparent""".split())
MATERIALS = set("""wooden wood metal metallic steel iron glass plastic leather fabric cotton wool woolen
woollen silk denim stone concrete brick marble ceramic porcelain paper cardboard rubber velvet straw wicker
bamboo furry fluffy knitted""".split())
PATTERNS = set("""striped stripy checkered checked plaid spotted dotted polka floral patterned printed
shiny glossy matte rusty worn dirty clean wet dry""".split())
SHAPES = set("""round square rectangular circular oval triangular curved straight pointed flat""".split())
SIZES = set("""small tiny little miniature large big huge giant tall short long wide narrow thin thick
distant""".split())
SMALL = {"small", "tiny", "little", "miniature", "distant", "thin"}
ATTRIBUTE_WORDS = COLOURS | MATERIALS | PATTERNS | SHAPES | SIZES
TEXT_WORDS = set("""sign signs label labels text logo logos lettering letters letter word words writing
inscription caption title headline banner poster plate license licence number numbers menu sticker
stickers graffiti slogan""".split())
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
           "ten": 10, "several": 3, "multiple": 3, "many": 3, "numerous": 3, "few": 2, "pair": 2}
DETERMINERS = {"a", "an", "the", "one", "some", "another", "this", "that", "these", "those", "its", "his",
               "her", "their", *NUMBERS}
PLACE_WORDS = set("""left right top bottom middle center centre front back side sides edge edges corner
corners background foreground image picture photo photograph scene view frame distance area part surface
way rest""".split())
PREPOSITIONS = set("""of on in at to from by with without near under over above below behind beside
besides between beneath underneath inside outside into onto upon against along across around through
toward towards atop among amid next beyond within""".split())
VERBS = set("""is are was were be being been sits sit sitting stands stand standing lies lie lying hangs
hang hanging rests rest resting placed located positioned seen visible appears appear shown leaning
leans holding holds has have wearing wears covered filled parked floating flying running walking reads
reading says saying written showing shows displaying displays labeled labelled""".split())
STOP_WORDS = PREPOSITIONS | VERBS | {"and", "or", "but", "that", "which", "who", "while", "where", "as",
                                     "than", "so", "then", "it", "they"}
RELATIONS = ("left of", "right of", "to the left", "to the right", "on the left", "on the right",
             "next to", "beside", "behind", "in front of", "on top of", "above", "below", "under",
             "underneath", "beneath", "between", "near", "inside", "atop", "against", "across from",
             "leaning on", "on", "in", "over")
_QUOTE = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]{1,60})[\"\u201c\u201d]|'([^']{1,40})'")
_CLAUSE = re.compile(r"[,;:()\[\]]|(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@dataclasses.dataclass(frozen=True)
class Entity:
    phrase: str  # lower-cased words of the description, e.g. "a small red sign"
    head: str
    attributes: tuple[str, ...]
    flags: tuple[str, ...]  # subset of multi_attribute, text, small, relation, count
    score: int
    position: int  # character offset of the clause in the description (tie-break)
    text: str | None = None  # quoted text attached to the phrase

    def describe(self) -> str:
        """How the entity is named in the edit-instruction prompt."""
        return f'{self.phrase} (text "{self.text}")' if self.text else self.phrase


def _phrases(words: list[str]) -> list[tuple[int, int]]:
    """(start, end) word spans of noun phrases: determiner + up to 6 words before a stop word."""
    spans, i = [], 0
    while i < len(words):
        if words[i] in DETERMINERS or words[i].isdigit():
            j = i + 1
            while j < len(words) and j - i <= 6:
                w = words[j]
                if w == "and" and j + 1 < len(words) and words[j + 1] in ATTRIBUTE_WORDS and j > i + 1:
                    j += 1
                    continue
                if w in STOP_WORDS or w in DETERMINERS:
                    break
                j += 1
            if j > i + 1:
                spans.append((i, j))
                i = j
                continue
        i += 1
    return spans


def _relation_after(words: list[str], end: int) -> bool:
    for skip in range(3):  # allow "is sitting" between the phrase and the relation
        if skip and (end + skip - 1 >= len(words) or words[end + skip - 1] not in VERBS):
            break
        tail = " ".join(words[end + skip:end + skip + 4])
        if any(tail == r or tail.startswith(r + " ") for r in RELATIONS):
            return True
    return False


def _relation_before(words: list[str], start: int) -> bool:
    head = " ".join(words[max(0, start - 4):start])
    return any(head == r or head.endswith(" " + r) for r in RELATIONS if r not in ("on", "in"))


def extract_entities(description: str) -> list[Entity]:
    """Every candidate noun phrase with its flags and score, in text order (before selection)."""
    entities = []
    position = 0
    for clause in _CLAUSE.split(description):
        if clause is None:
            continue
        offset = description.find(clause, position)
        position = offset if offset >= 0 else position
        quotes = [(m.start(), m.group(1) or m.group(2)) for m in _QUOTE.finditer(clause)]
        # Quotes are blanked with spaces of the same length, so word offsets still match the clause.
        lowered = _QUOTE.sub(lambda m: " " * len(m.group(0)), clause.lower())
        matches = list(_WORD.finditer(lowered))
        words = [m.group(0) for m in matches]
        spans = _phrases(words)
        for start, end in spans:
            det, mods, head = words[start], words[start + 1:end - 1], words[end - 1]
            if head in PLACE_WORDS or head in ATTRIBUTE_WORDS:
                continue
            attributes = tuple(m for m in mods if m in ATTRIBUTE_WORDS and m != "and")
            flags, score = [], len(attributes)
            if len(attributes) >= 2:
                flags.append("multi_attribute")
                score += 2
            # A quote belongs to the closest phrase ending before it ('a sign that reads "OPEN"').
            phrase_end = matches[end - 1].end()
            next_start = min((matches[s].start() for s, _ in spans if s >= end), default=1 << 30)
            text = next((q for at, q in quotes if phrase_end <= at < next_start), None)
            if text or head in TEXT_WORDS or any(m in TEXT_WORDS for m in mods):
                flags.append("text")
                score += 3
            if any(m in SMALL for m in mods):
                flags.append("small")
                score += 2
            if _relation_after(words, end) or _relation_before(words, start):
                flags.append("relation")
                score += 1
            if NUMBERS.get(det, 1) > 1 or (det.isdigit() and int(det) > 1):
                flags.append("count")
                score += 1
            phrase = " ".join(words[start:end])
            entities.append(Entity(phrase, head, attributes, tuple(flags), score, position, text))
    return entities


def select_entities(description: str, max_entities: int, min_score: int) -> list[Entity]:
    """The hard entities of a description: see the module docstring for the rules."""
    best: dict[str, Entity] = {}
    for e in extract_entities(description):
        key = " ".join(w for w in e.phrase.split() if w not in DETERMINERS)
        if e.score >= min_score and key not in best:
            best[key] = e
    ranked = sorted(best.values(), key=lambda e: (-e.score, e.position))
    return ranked[:max_entities]
