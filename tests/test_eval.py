"""`viper eval`: answer extraction, scoring, VLMEvalKit-style TSV reading, and one end-to-end run through
the real (tiny, random) JAX model."""

from __future__ import annotations

import base64
import csv
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_vlm import build_tiny_vlm_dir, image_bytes  # noqa: E402
from viper_jax.evaluation import answers  # noqa: E402
from viper_jax.evaluation.tsv import MCQ, YES_NO, build_prompt_text, read_tsv  # noqa: E402

OPTS = {"A": "a cat", "B": "a dog", "C": "dark red", "D": "red"}


# ------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize("response,expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("**C**", "C"), (" [D] ", "D"),
    ("Answer: B", "B"), ("The answer is B", "B"), ("The answer is (b).", "B"), ("the correct option is C.", "C"),
    ("Option D is correct.", "D"), ("B. a dog", "B"), ("(b) a dog", "B"), ("C) dark red", "C"),
    ("A dog.", "B"), ("a cat", "A"), ("I think B", "B"), ("The answer is a dog", "B"),
    ("It is dark red.", "C"), ("It is red.", "D"), ("The answer is not A but B", "B"),
    ("A cat sits on the mat", "A"),  # the leading "A" is an article; the option text decides
    ("A or B", None), ("I cannot tell.", None), ("", None), ("It shows a dog and a cat", None),
    ("E", None),  # not an option
])
def test_extract_choice(response, expected):
    assert answers.extract_choice(response, OPTS) == expected


@pytest.mark.parametrize("response,expected", [
    ("Yes", "yes"), ("no.", "no"), ("YES!", "yes"), ("No, there is no dog.", "no"), ("The answer is yes.", "yes"),
    ("I think the answer: No", "no"), ("There is a dog, so yes", "yes"), ("maybe", None), ("", None),
    ("It could be yes or no", None),
])
def test_extract_yes_no(response, expected):
    assert answers.extract_yes_no(response) == expected
    assert answers.extract(response, {}) == expected


@pytest.mark.parametrize("response,options,expected", [
    ("<think>Option B looks close but it is not.</think><answer>D</answer>", OPTS, "D"),
    ("<think>I see a dog.</think><answer>The answer is C.</answer>", OPTS, "C"),
    ("<think>Is it a cat? B or D?</think><answer>a cat", OPTS, "A"),  # answer block never closed
    ("<think>No doubt about it.</think><answer>yes</answer>", {}, "yes"),
    ("<think>yes, a dog</think><answer>No.</answer>", {}, "no"),
    ("<answer>B</answer><answer>C</answer>", OPTS, "C"),  # the last block is the final answer
])
def test_extract_judges_the_answer_block_only(response, options, expected):
    assert answers.extract(response, options) == expected


def test_scoring_per_category_by_hand():
    rows = [  # (category, answer, options, response)
        ("color", "C", OPTS, "C"),                  # right
        ("color", "C", OPTS, "It is red."),         # wrong (D)
        ("color", "D", OPTS, "hmm"),                # unparsed
        ("count", "yes", {}, "Yes, two."),           # right
        ("count", "no", {}, "yes"),                  # wrong
        ("count", "no", {}, "The answer is no"),     # right
        ("scene", "A", OPTS, "<think>a cat</think><answer>(a)</answer>"),  # right, in the reasoning format
    ]
    preds = []
    for cat, ans, opts, resp in rows:
        got = answers.extract(resp, opts)
        preds.append({"category": cat, "extracted": got, "correct": got == ans,
                      "formatted": answers.well_formed(resp), "chance": answers.chance(opts)})
    overall, per = answers.score(preds)
    assert overall.to_dict() == {"accuracy": 4 / 7, "correct": 4, "total": 7, "unparsed": 1,
                                 "format_rate": 1 / 7, "chance": pytest.approx((4 * 0.25 + 3 * 0.5) / 7)}
    assert per["count"].to_dict()["chance"] == 0.5 and per["color"].to_dict()["format_rate"] == 0.0
    assert list(per) == ["color", "count", "scene"]
    assert (per["color"].correct, per["color"].total, per["color"].unparsed) == (1, 3, 1)
    assert per["count"].accuracy == pytest.approx(2 / 3) and per["scene"].accuracy == 1.0


# ----------------------------------------------------------------------------------------------- TSV

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_tsv(path: Path, header: list[str], rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")  # pandas' to_csv quoting (QUOTE_MINIMAL)
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    return path


HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]


def bench_rows() -> list[dict]:
    img = b64(image_bytes(0))
    return [
        dict(index=1, question="What animal?", hint="Look\tclosely.", A="cat", B="dog", C="bird", D="fish",
             answer="B", category="animals", image=img),
        dict(index=2, question="Which colour?", A="red", B="blue", C="nan", answer="A", category="colours",
             image=b64(image_bytes(1, (84, 56), "JPEG"))),
        dict(index=3, question="Is there a cat? Please answer yes or no.", answer="Yes", category="animals", image="1"),
        dict(index=4, question="Is it night?", answer="no", category="scene", image=img),
        dict(index=5, question="Broken image?", A="x", B="y", answer="A", category="scene",
             image=b64(b"not an image " * 8)),
        dict(index=6, question="No answer?", A="x", B="y", answer="", category="scene", image=img),
        dict(index=7, question="Answer outside the options?", A="x", B="y", answer="C", category="scene", image=img),
        dict(index=8, question="How many?", answer="3", category="count", image=img),  # open-ended
        dict(index=9, question="Second row 1?", A="x", B="y", answer="B", category="scene", image=img),
        dict(index=9, question="Duplicate index", A="x", B="y", answer="B", category="scene", image=img),
        dict(index=10, question="Wrong reference", A="x", B="y", answer="B", category="scene", image="99"),
    ]


def test_read_tsv_rows_prompts_and_bad_rows(tmp_path):
    data = read_tsv(write_tsv(tmp_path / "bench.tsv", HEADER, bench_rows()))
    assert [r.index for r in data.rows] == ["1", "2", "3", "4", "9"]
    assert {(s.index, s.reason) for s in data.skipped} == {
        ("5", "bad_image"), ("6", "missing_answer"), ("7", "bad_answer"), ("8", "bad_answer"),
        ("9", "duplicate_index"), ("10", "bad_image")}
    messages = {s.index: s.message for s in data.skipped}
    assert "image 0 does not decode" in messages["5"] and "too short for an image" in messages["10"]
    r1, r2, r3, r4, _ = data.rows
    assert r1.kind == MCQ and r1.answer == "B" and r1.hint == "Look\tclosely."
    assert r1.prompt() == ("Hint: Look\tclosely.\nQuestion: What animal?\nOptions:\nA. cat\nB. dog\nC. bird\nD. fish\n"
                           "Answer with the option's letter from the given choices directly.")
    assert r2.options == {"A": "red", "B": "blue"} and r2.hint is None  # "nan" and empty cells are no option
    assert r2.open_images()[0].size == (84, 56)
    assert r3.kind == YES_NO and r3.answer == "yes" and r3.images == r1.images  # image "1": row 1's image
    assert r3.prompt() == "Is there a cat? Please answer yes or no."  # not asked twice
    assert r4.prompt() == "Is it night?\nPlease answer yes or no."
    assert build_prompt_text("Q?", {"A": "x", "B": "y"}) == \
        "Question: Q?\nOptions:\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."


def test_read_tsv_image_path_and_limit(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(3))
    path = write_tsv(tmp_path / "p.tsv", ["index", "question", "A", "B", "answer", "image_path"], [
        dict(index="a", question="Q", A="x", B="y", answer="b", image_path="img/a.png"),
        dict(index="b", question="Q", A="x", B="y", answer="a", image_path="['img/a.png', 'img/a.png']"),
        dict(index="c", question="Q", A="x", B="y", answer="a", image_path="img/missing.png")])
    data = read_tsv(path)
    assert [(r.index, r.answer, len(r.images), r.category) for r in data.rows] == [("a", "B", 1, "none"),
                                                                                    ("b", "A", 2, "none")]
    assert [(s.index, s.reason) for s in data.skipped] == [("c", "bad_image")]
    assert len(read_tsv(path, limit=1).rows) == 1


def test_read_tsv_refuses_a_file_without_answers(tmp_path):
    path = write_tsv(tmp_path / "test_split.tsv", ["index", "question", "A", "B", "image"],
                     [dict(index=1, question="Q", A="x", B="y", image=b64(image_bytes(0)))])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
        read_tsv(path)


# ---------------------------------------------------------------------------------------- end to end

def test_viper_eval_end_to_end(tmp_path, capsys):
    from viper_jax.cli import main as viper

    model = build_tiny_vlm_dir(tmp_path / "model", seed=1)
    rows = bench_rows()
    for r in rows:  # one image size for every valid row: one compiled program
        if r["index"] == 2:
            r["image"] = b64(image_bytes(1))
    rows.append(dict(index=11, question="Which?", A="up", B="down", answer="A", category="scene",
                     image=rows[0]["image"]))
    bench = write_tsv(tmp_path / "bench.tsv", HEADER, rows)
    other = write_tsv(tmp_path / "yn.tsv", ["index", "question", "answer", "image"],
                      [dict(index=1, question="Is it blue?", answer="no", image=rows[0]["image"])])
    out = tmp_path / "results" / "r.json"
    viper(["eval", "--model", str(model), "--tsv", str(bench), "--tsv", str(other), "--batch_size", "3",
           "--max_new_tokens", "6", "--prompt_buckets", "512", "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["files"]) == ["bench", "yn"]
    bench_res = res["files"]["bench"]
    preds = bench_res["predictions"]
    assert [p["index"] for p in preds] == ["1", "2", "3", "4", "9", "11"]  # one per valid row, file order
    assert bench_res["skipped"]["count"] == 6
    assert bench_res["compiled_shapes"] == 1  # two batches of 3, one bucket, one image size
    assert bench_res["skipped"]["by_reason"] == {"bad_answer": 2, "bad_image": 2, "duplicate_index": 1,
                                                 "missing_answer": 1}
    data = read_tsv(bench)
    for p, row in zip(preds, data.rows):
        assert p["extracted"] == answers.extract(p["response"], row.options)
        assert p["correct"] == (p["extracted"] == row.answer) and p["answer"] == row.answer
    overall = bench_res["overall"]
    assert overall["total"] == 6 and overall["correct"] == sum(p["correct"] for p in preds)
    assert overall["unparsed"] == sum(p["extracted"] is None for p in preds)
    assert sum(c["total"] for c in bench_res["categories"].values()) == 6
    assert set(bench_res["categories"]) == {"animals", "colours", "scene"}
    assert res["files"]["yn"]["overall"]["total"] == 1 and list(res["files"]["yn"]["categories"]) == ["none"]
    assert f"bench: accuracy {100 * overall['accuracy']:.2f}%" in printed and "yn: accuracy" in printed
