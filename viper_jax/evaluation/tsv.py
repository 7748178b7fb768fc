"""VLMEvalKit-style benchmark TSVs: reading, validating, and building each row's prompt.

Columns (tab-separated, a header row, pandas `to_csv(sep="\\t")` quoting, as VLMEvalKit writes them):
  index      row id (unique within the file)
  question   the question text
  A, B, ...  option texts, consecutive letters from A; a missing/NaN/empty cell means "no such option"
  answer     the option letter (multiple choice) or yes/no (when the row has no options)
  image      base64 image bytes; a list of them written as a Python list string; or (<= 64 characters)
             the index of another row whose image it shares (MMBench does this)
  image_path alternative to image: a file path (relative to the TSV's folder), or a list of paths
  category   optional (rows without one count under "none"); hint optional
A bad row (undecodable image, missing answer, answer not among the options, ...) is skipped and
reported with its index and reason; the rest of the file is still evaluated.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import io
import string
import sys
from pathlib import Path
from typing import Any

from viper_common.image_checks import check_usable

# pandas' default NA strings: VLMEvalKit reads TSVs with pandas, so these cells are NaN there too.
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
OPTION_LETTERS = string.ascii_uppercase
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please answer yes or no."
MCQ, YES_NO = "mcq", "yes_no"


@dataclasses.dataclass
class EvalRow:
    index: str
    question: str
    options: dict[str, str]  # letter -> text, in letter order (empty for yes/no)
    answer: str              # an option letter, or "yes"/"no"
    category: str
    hint: str | None
    images: list[bytes]      # encoded image files, decodable by PIL (checked on reading)
    kind: str                # MCQ or YES_NO

    def prompt(self) -> str:
        return build_prompt_text(self.question, self.options, self.hint)

    def open_images(self) -> list[Any]:
        return [_decode_image(b) for b in self.images]


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    index: str | None
    reason: str
    message: str


@dataclasses.dataclass
class TsvData:
    path: str
    rows: list[EvalRow]
    skipped: list[SkippedRow]


class RowError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def build_prompt_text(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's multiple-choice layout with the direct-answer instruction; for a yes/no question the
    instruction is appended unless the question already asks for it (MME's questions do)."""
    parts = [f"Hint: {hint}"] if hint else []
    if options:
        parts.append(f"Question: {question}")
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in options.items()))
        parts.append(MCQ_INSTRUCTION)
    else:
        asked = YES_NO_INSTRUCTION.lower() in question.lower()
        parts.append(question if asked else f"{question}\n{YES_NO_INSTRUCTION}")
    return "\n".join(parts)


def _cell(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    value = value.strip()
    return None if value in NA_STRINGS else value


def _decode_image(data: bytes) -> Any:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    check_usable(img)  # 16-bit or animated: the image processor's RGB conversion would read it wrongly
    return img


def _as_list(value: str) -> list[str]:
    """A cell holding one item or a Python list string of them (VLMEvalKit's `toliststr`)."""
    if value.startswith("[") and value.endswith("]"):
        try:
            items = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise RowError("bad_image", f"unparseable image list: {e}") from e
        return [str(x) for x in items]
    return [value]


def _images(row: dict[str, Any], by_index: dict[str, str], folder: Path) -> list[bytes]:
    value = _cell(row, "image")
    if value is not None:
        if len(value) <= 64:  # a reference to another row's image
            if value not in by_index:
                raise RowError("bad_image", f"image cell {value!r} is too short for an image, and no row with "
                                            f"that index has one (short cells refer to another row's image)")
            value = by_index[value]
        out = []
        for item in _as_list(value):
            try:
                out.append(base64.b64decode(item, validate=False))
            except (binascii.Error, ValueError) as e:
                raise RowError("bad_image", f"image is not base64: {e}") from e
    else:
        value = _cell(row, "image_path")
        if value is None:
            raise RowError("missing_image", "no image or image_path")
        out = []
        for item in _as_list(value):
            path = Path(item) if Path(item).is_absolute() else folder / item
            try:
                out.append(path.read_bytes())
            except OSError as e:
                raise RowError("bad_image", f"cannot read {path}: {e}") from e
    for k, data in enumerate(out):
        try:
            _decode_image(data)
        except Exception as e:  # noqa: BLE001 - anything PIL cannot decode
            raise RowError("bad_image", f"image {k} does not decode: {type(e).__name__}: {e}") from e
    return out


def _options(row: dict[str, Any]) -> dict[str, str]:
    options: dict[str, str] = {}
    for letter in OPTION_LETTERS:
        if letter not in row:
            break
        text = _cell(row, letter)
        if text is not None:
            options[letter] = text
    return options


def _parse_row(row: dict[str, Any], by_index: dict[str, str], folder: Path) -> EvalRow:
    if None in row or any(v is None for v in row.values()):
        raise RowError("malformed_row", "wrong number of fields")
    index = _cell(row, "index")
    question = _cell(row, "question")
    if question is None:
        raise RowError("missing_question", "empty question")
    answer = _cell(row, "answer")
    if answer is None:
        raise RowError("missing_answer", "empty answer")
    options = _options(row)
    if options:
        kind, answer = MCQ, answer.upper()
        if answer not in options:
            raise RowError("bad_answer", f"answer {answer!r} is not one of the options {sorted(options)}")
        if len(options) < 2:
            raise RowError("bad_options", f"only {len(options)} option(s)")
    else:
        kind, answer = YES_NO, answer.lower()
        if answer not in ("yes", "no"):
            raise RowError("bad_answer", f"no options and the answer {answer!r} is not yes/no "
                                         f"(open-ended questions are not supported)")
    return EvalRow(index=str(index), question=question, options=options, answer=answer,
                   category=_cell(row, "category") or "none", hint=_cell(row, "hint"),
                   images=_images(row, by_index, folder), kind=kind)


def read_tsv(path: str | Path, limit: int | None = None) -> TsvData:
    """Valid rows and skipped rows of a benchmark TSV. Raises ValueError when a required column is
    missing (e.g. a test split without `answer`)."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    try:
        with path.open(newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f, delimiter="\t"))
    except UnicodeDecodeError as e:  # its own message names neither the file nor that UTF-8 is expected
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); benchmark TSVs are UTF-8") from None
    header = set(records[0]) if records else set()
    if not records:
        raise ValueError(f"{path}: no rows")
    missing = {"index", "question", "answer"} - header
    if missing or not header & {"image", "image_path"}:
        need = sorted(missing) + ([] if header & {"image", "image_path"} else ["image (or image_path)"])
        raise ValueError(f"{path}: missing column(s) {need}; has {sorted(k for k in header if k)}")
    by_index = {}
    for r in records:
        idx, img = _cell(r, "index"), _cell(r, "image")
        if idx is not None and img is not None and len(img) > 64:
            by_index[idx] = img
    rows: list[EvalRow] = []
    skipped: list[SkippedRow] = []
    seen: set[str] = set()
    for n, r in enumerate(records[:limit] if limit else records):
        index = _cell(r, "index")
        try:
            if index is None:
                raise RowError("missing_index", f"data row {n + 1} has no index")
            if index in seen:
                raise RowError("duplicate_index", f"index {index} appears twice")
            seen.add(index)
            rows.append(_parse_row(r, by_index, path.parent))
        except RowError as e:
            skipped.append(SkippedRow(index, e.reason, str(e)))
    return TsvData(str(path), rows, skipped)
