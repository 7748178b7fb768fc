"""ShapeWorld's benchmark, the base model's data and the world tokenizer.

Every benchmark answer is re-checked against its scene by an evaluator written here from the question's
structured meaning (not the generator's code); multi-image options are checked through their TEXT, parsed
back with edits.parse_instruction. The TSVs are read with `viper eval`'s own reader.
"""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from viper_common import prompts, records
from viper_common.shapeworld import base_data, bench, edits, questions, render
from viper_common.shapeworld.scene import CELLS, PATTERNS
from viper_common.shapeworld.splits import SEED_RANGES, seed_block
from viper_jax.evaluation.tsv import read_tsv

N_CHECKED = 175  # every question of the default test split


# ------------------------------------------------------------------------------ an independent evaluator

def _objects(scene, ref):
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in ref.items())]


def _one(scene, ref):
    found = _objects(scene, ref)
    assert len(found) == 1, f"reference {ref} picks {len(found)} objects"
    return found[0]


def _sign(x):
    return (x > 0) - (x < 0)


def _key(scene):
    return scene.background, sorted((o.cell, o.shape, o.hue, o.shade, o.size, o.pattern, o.label) for o in scene.objects)


def option_truths(q) -> list[bool]:
    """Whether each option (or, for yes/no, 'yes') is true of the question's scene(s)."""
    scene, spec = q.scenes[0], q.spec
    op = spec["op"]
    if op == "exists":
        return [bool(_objects(scene, spec["filter"]))]
    if op == "background":
        return [v == scene.background for v in q.values]
    if op == "attribute":
        obj = _one(scene, spec["ref"])
        return [v == getattr(obj, spec["attr"]) for v in q.values]
    if op == "colour":
        obj = _one(scene, spec["ref"])
        return [v == f"{obj.shade} {obj.hue}" for v in q.values]
    if op == "object_at":
        obj = next(o for o in scene.objects if o.cell == spec["cell"])
        return [(v["hue"], v["shape"]) == (obj.hue, obj.shape) for v in q.values]
    if op == "count":
        return [v == len(_objects(scene, spec["filter"])) for v in q.values]
    if op == "direction":
        a, b = _one(scene, spec["a"]), _one(scene, spec["b"])
        d = [_sign(a.row_col[0] - b.row_col[0]), _sign(a.row_col[1] - b.row_col[1])]
        return [list(v) == d for v in q.values]
    if op == "relation":
        b = _one(scene, spec["b"])
        axis, sign = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}[spec["relation"]]
        truths = []
        for v in q.values:
            named = _objects(scene, v)
            on_side = [o for o in named if _sign(o.row_col[axis] - b.row_col[axis]) == sign]
            # True only when the name picks one object and it is on that side; a distractor names none there.
            truths.append(len(named) == 1 and len(on_side) == 1 if on_side else False)
        return truths
    if op == "edit":
        original, edited = q.scenes
        truths = []
        for text in q.options:
            parsed = edits.parse_instruction(text, original)
            truths.append(_key(edits.apply_edit(original, parsed)) == _key(edited))
        return truths
    raise AssertionError(f"unknown op {op}")


@pytest.mark.parametrize("category", questions.CATEGORIES)
def test_every_answer_is_right_and_no_distractor_is(category):
    """All 175 test-split questions of the category, regenerated from their seeds."""
    facets = collections.Counter()
    for seed, slot, q in bench.generate("test", category, N_CHECKED):
        again = questions.make_question(category, seed, slot)
        assert again == q  # deterministic from (seed, slot)
        truths = option_truths(q)
        facets[q.facet] += 1
        if q.kind == "yes_no":
            assert q.answer == ("yes" if truths[0] else "no")
            continue
        assert len(q.options) == 4 and len(set(q.options)) == 4, q
        assert truths == [letter == q.answer for letter in "ABCD"], (q.question, q.options, q.answer, truths)
        for ref in [q.spec.get(k) for k in ("ref", "a", "b") if q.spec.get(k)]:
            for k, v in ref.items():  # the text says what the reference holds
                assert (CELLS[v] if k == "cell" else v) in q.question, (q.question, ref)
        if q.spec["op"] == "attribute":
            assert q.spec["attr"] not in q.spec["ref"]  # the reference never gives the answer away
    assert len(facets) >= 2, facets


def test_fine_distractors_are_close_and_hallucinations_plausible():
    for _, _, q in bench.generate("test", "fine", 120):
        if q.facet == "shade":
            hue = q.values["ABCD".index(q.answer)].split()[1]
            assert {f"light {hue}", f"dark {hue}"} <= set(q.options)
        if q.facet == "pattern":
            assert sorted(q.options) == sorted(PATTERNS)
        if q.facet == "label":
            correct = q.values["ABCD".index(q.answer)]
            assert set(q.values) - {correct} == set(questions.LETTER_NEIGHBOURS[correct])
    kinds = collections.Counter()
    for _, slot, q in bench.generate("test", "hallucination", 100):
        scene, f = q.scenes[0], q.spec["filter"]
        if q.answer == "no":
            assert any(o.hue == f["hue"] or o.shape == f["shape"] for o in scene.objects)  # near miss
        kinds[q.answer] += 1
    assert kinds == {"yes": 50, "no": 50}


def test_option_structure_does_not_give_the_answer_away():
    """Blind guesses from the options' text alone stay near chance: the option sharing the most hue/shape
    with the others (coarse 'which object is at ...'), and any rank among the sorted counts."""
    hits = total = 0
    for _, _, q in bench.generate("test", "coarse", 600):
        if q.facet == "object_at":
            overlap = [sum(v["hue"] == w["hue"] or v["shape"] == w["shape"] for w in q.values if w is not v)
                       for v in q.values]
            hits += "ABCD"[max(range(4), key=lambda i: (overlap[i], -i))] == q.answer
            total += 1
    assert total > 100 and hits / total < 0.35, (hits, total)
    ranks = collections.Counter(sorted(q.values).index(q.values["ABCD".index(q.answer)])
                                for _, _, q in bench.generate("test", "counting", 200))
    assert ranks == dict.fromkeys(range(4), 50)


def test_answer_letters_balanced_and_default_split_sizes():
    for category in questions.CATEGORIES:
        answers = collections.Counter(q.answer for _, _, q in bench.generate("test", category, 40))
        assert answers == ({"yes": 20, "no": 20} if category == "hallucination" else dict.fromkeys("ABCD", 10))
    n = bench.DEFAULT_PER_CATEGORY["test"]
    assert n >= 150 and n * len(questions.CATEGORIES) >= 1000
    assert bench.DEFAULT_PER_CATEGORY["val"] >= 20


def test_seed_ranges_are_disjoint_and_blocks_stay_inside():
    names = sorted(SEED_RANGES)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = SEED_RANGES[a], SEED_RANGES[b]
            assert ra.stop <= rb.start or rb.stop <= ra.start, (a, b)
    for split in ("val", "test"):
        last = seed_block(split, len(questions.CATEGORIES) - 1, bench.SEEDS_PER_CATEGORY)
        assert last.stop <= SEED_RANGES[split].stop
    with pytest.raises(ValueError, match="leaves split"):
        seed_block("val", 10, bench.SEEDS_PER_CATEGORY)
    # What the benchmark actually used sits in its split, apart from the other split and training seeds.
    used = {split: {s for c in questions.CATEGORIES for s, _, _ in bench.generate(split, c, 30)} for split in ("val", "test")}
    assert all(s in SEED_RANGES[split] for split in used for s in used[split])
    assert all(ex.seed in SEED_RANGES["base_train"] for ex in base_data.examples(5, start=10_000))


# ------------------------------------------------------------------------------------------- the TSVs

def test_benchmark_tsv_loads_in_viper_eval_reader(tmp_path):
    n = 8
    path = bench.write_benchmark(tmp_path, "val", n, size=56)
    data = read_tsv(path)
    assert data.skipped == []
    assert len(data.rows) == n * len(questions.CATEGORIES)
    by_cat = collections.defaultdict(list)
    for row in data.rows:
        by_cat[row.category].append(row)
    assert {c: len(r) for c, r in by_cat.items()} == dict.fromkeys(questions.CATEGORIES, n)
    regenerated = {c: list(bench.generate("val", c, n)) for c in questions.CATEGORIES}
    for category, rows in by_cat.items():
        for row, (seed, slot, q) in zip(rows, regenerated[category]):
            assert (row.question, tuple(row.options.values()), row.answer) == (q.question, q.options, q.answer)
            assert row.kind == ("yes_no" if category == "hallucination" else "mcq")
            assert len(row.images) == (2 if category == "multi_image" else 1)
            for image, scene in zip(row.images, q.scenes):  # the pixels are this scene's, from this seed
                assert render.read_scene(image) == scene
                assert np.array_equal(np.asarray(row.open_images()[0].convert("RGB")) if scene is q.scenes[0] else
                                      np.asarray(row.open_images()[1].convert("RGB")),
                                      np.asarray(render.render(scene, seed, 56)))
            if row.options:
                assert "Options:\nA. " in row.prompt()
    manifest = json.loads((tmp_path / "manifest.json").read_text())["splits"]["val"]
    assert manifest["num_questions"] == n * 6
    assert manifest["categories"]["hallucination"]["chance"] == 0.5
    assert manifest["categories"]["coarse"]["chance"] == 0.25
    assert manifest["categories"]["fine"]["answers"] == dict.fromkeys("ABCD", 2)


def test_viper_eval_scores_the_benchmark(tmp_path, capsys):
    """`viper eval` with a tiny random model runs every row of a small benchmark: none skipped."""
    from tiny_vlm import build_tiny_vlm_dir

    from viper_jax.cli import main as viper

    path = bench.write_benchmark(tmp_path / "bench", "val", 2, size=56)
    model = build_tiny_vlm_dir(tmp_path / "model", seed=3)
    out = tmp_path / "r.json"
    viper(["eval", "--model", str(model), "--tsv", str(path), "--batch_size", "6", "--max_new_tokens", "4",
           "--prompt_buckets", "512", "--out", str(out)])
    res = json.loads(out.read_text())["files"]["shapeworld_val"]
    assert res["skipped"]["count"] == 0
    assert res["overall"]["total"] == 12
    assert sorted(res["categories"]) == sorted(questions.CATEGORIES)


# ------------------------------------------------------------------------------------------- base data

def _frame(text: str) -> str:
    """The first four words of a question (after a 'Question: ' header): its template."""
    text = text.split("Question: ", 1)[-1]
    return " ".join(text.split()[:4])


def test_base_data_has_no_benchmark_questions_and_no_viper_tasks():
    exs = list(base_data.examples(400, weights={**base_data.DEFAULT_WEIGHTS, "edit": 0.15, "follow": 0.15}))
    assert set(ex.kind for ex in exs) == set(base_data.KINDS)
    bench_texts = {q.question for c in questions.CATEGORIES for _, _, q in bench.generate("test", c, 60)}
    bench_frames = {_frame(t) for t in bench_texts}
    viper_prompts = [p.split("{")[0][:60] for p in prompts.TRAINING_PROMPTS.values()]
    answer_format = re.compile(r"^<think>[^<]+</think><answer>[^<]+</answer>$")
    typed_op = re.compile(r"^(attribute|add|remove|replace|move|count|text):", re.MULTILINE)
    for ex in exs:
        assert answer_format.match(ex.answer), ex.answer
        assert not any(t in ex.prompt for t in bench_texts)
        assert _frame(ex.prompt) not in bench_frames, ex.prompt
        assert not any(p in ex.prompt for p in viper_prompts)
        assert len(ex.images) == (2 if ex.kind == "compare" else 1) or (ex.kind == "edit" and "yes or no" in ex.prompt)
        # Typed edit lines only as the instructions an editor is asked for (one image): never as what
        # differs between two images (ViPER's stage-2 task).
        assert not typed_op.search(ex.answer) or (ex.kind == "edit" and len(ex.images) == 1), ex.prompt
    # Compare answers state a coarse difference (or sameness), never an edit-operation list.
    compare = [ex.answer for ex in exs if ex.kind == "compare"]
    assert compare and not any(re.search(r"\b(attribute|add|remove|replace|move|count|text):", a) for a in compare)


def test_base_data_answers_are_true(tmp_path):
    """The open answers say what the scene holds (the scene is read back from the image's metadata)."""
    checked = 0
    for ex in base_data.examples(200):
        scene = render.read_scene(ex.images[0])
        m = re.match(r"Tell me the (shape|colour) of the object (.+)\.$", ex.prompt)
        if m:
            cell = base_data.language.find_cell(m.group(2))[0]
            obj = scene.objects[scene.object_at(cell)]
            assert (obj.shape if m.group(1) == "shape" else obj.hue) in ex.answer
            checked += 1
        if ex.prompt == "Count the objects in this image.":
            word = base_data.language.NUMBER_WORDS[len(scene.objects)]
            assert f"{word} object" in ex.answer
            checked += 1
    assert checked >= 10


def test_base_data_choices_are_true():
    """Multiple-choice answers: the letter's option is the scene's hue / shape at the named position; yes / no
    questions about a shape or a colour there are answered by the scene."""
    checked = {"mcq": 0, "yes_no": 0}
    for ex in base_data.examples(300, weights={"describe": 0, "ask": 0, "compare": 0, "choose": 1}):
        scene = render.read_scene(ex.images[0])
        answer = re.search(r"<answer>(.+)</answer>", ex.answer).group(1)
        mcq = re.match(r"Question: (?:Tell me the colour of the object|Which shape do you see) (.+?)[.?]\nOptions:\n"
                       r"((?:[A-D]\. .+\n){4})", ex.prompt)
        if mcq:
            obj = scene.objects[scene.object_at(base_data.language.find_cell(mcq.group(1))[0])]
            options = dict(line.split(". ", 1) for line in mcq.group(2).strip().split("\n"))
            assert options[answer] == (obj.hue if "colour" in ex.prompt else obj.shape), ex.prompt
            checked["mcq"] += 1
        yes_no = re.match(r"Is the object (.+) (\w+)\?\n", ex.prompt)
        if yes_no:
            where, word = yes_no.group(1), yes_no.group(2)
            obj = scene.objects[scene.object_at(base_data.language.find_cell(where)[0])]
            assert answer == ("Yes." if word in (obj.hue, obj.shape) else "No."), ex.prompt
            checked["yes_no"] += 1
    assert min(checked.values()) >= 20, checked


def test_one_object_scenes_are_asked_about_the_object():
    """one_object_share=1: every scene holds one object, and its shape / colour questions name no position; the
    default (0) leaves the data as it was (no extra random draw)."""
    asked = 0
    for ex in base_data.examples(120, one_object_share=1.0):
        scene = render.read_scene(ex.images[0])
        assert len(scene.objects) == 1
        if ex.prompt in ("Tell me the colour of the object.", "Which colour does the object have?"):
            assert ex.answer.endswith(f"<answer>It is {scene.objects[0].hue}.</answer>")
            asked += 1
        if ex.prompt in ("Which shape do you see?", "Tell me the shape of the object."):
            assert f" {scene.objects[0].shape}.</answer>" in ex.answer
            asked += 1
    assert asked >= 5
    assert [e.answer for e in base_data.examples(20)] == [e.answer for e in base_data.examples(20, one_object_share=0)]
    with pytest.raises(ValueError, match="one_object_share"):
        base_data.write_base_data("/nonexistent-never-written", 1, one_object_share=1.5)


def test_base_data_shards_round_trip_and_resume(tmp_path):
    out = base_data.write_base_data(tmp_path / "d", 30, size=56, shard_size=12)
    manifest = records.read_manifest(out)
    assert manifest["num_records"] == 30 and len(manifest["shards"]) == 3
    assert sum(manifest["kinds"].values()) == 30
    got = [records.decode(b) for name in sorted(manifest["shards"]) for b in records.read_shard(out / name)]
    want = list(base_data.examples(30, size=56))
    assert [(r.id, r.task, r.prompt, r.answer, r.images) for r in got] == \
        [(e.id, records.INSTRUCT, e.prompt, e.answer, e.images) for e in want]
    first, last = (out / n for n in sorted(manifest["shards"])[::2])
    before = first.stat().st_mtime_ns, first.read_bytes()
    expected_last = last.read_bytes()
    last.unlink()  # as if killed before the last shard was renamed into place
    (out / records.MANIFEST_NAME).unlink()
    base_data.write_base_data(tmp_path / "d", 30, size=56, shard_size=12)
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before  # kept, not rewritten
    assert last.read_bytes() == expected_last
    assert records.read_manifest(out) | {"created": None} == manifest | {"created": None}
    with pytest.raises(ValueError, match="settings.json: this folder holds base data written with other settings"):
        base_data.write_base_data(tmp_path / "d", 30, size=112, shard_size=12)
    # Two worker processes write the same bytes as one.
    par = base_data.write_base_data(tmp_path / "p", 30, size=56, shard_size=12, workers=2)
    assert [(par / n).read_bytes() for n in sorted(manifest["shards"])] == \
        [(out / n).read_bytes() for n in sorted(manifest["shards"])]


# ------------------------------------------------------------------------------------------- tokenizer

def test_world_tokenizer_round_trips_and_templates_images(tmp_path):
    from transformers import AutoTokenizer

    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.data.processing import chat_prompt_ids, vision_tokens
    from viper_jax.world.tokenizer import SPECIAL_TOKENS, build_world_tokenizer, tokens_per_text, world_texts

    build_world_tokenizer(tmp_path / "tok", world_texts(150), vocab_size=700)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == 700
    held_out = [ex.answer for ex in base_data.examples(20, start=5_000_000) if ex.kind != "compare"]
    for text in held_out + ["Ünïcode ✓ zebra 123 <think>?</think>", "  two  spaces\tand a tab\n"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for special in SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = chat_prompt_ids(tok, 2, "What is different between the two images?")
    vt = vision_tokens(tok)
    text = tok.decode(ids)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2 and (ids == vt.image).sum() == 2
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("What is different between the two images?<|im_end|>\n<|im_start|>assistant\n")
    # Several-fold shorter than the byte tokenizer on text it was not trained on.
    assert tokens_per_text(build_tiny_tokenizer(), held_out) > 3 * tokens_per_text(tok, held_out)


# ------------------------------------------------------------------------------------------------- CLI

def test_viper_world_cli(tmp_path, capsys):
    from transformers import AutoTokenizer

    from viper_jax.cli import main as viper

    viper(["world", "bench", "--out", str(tmp_path / "b"), "--n_per_category", "3", "--val_per_category", "2",
           "--size", "56"])
    assert "test: 18 questions" in capsys.readouterr().out
    for split, n in (("test", 18), ("val", 12)):
        data = read_tsv(tmp_path / "b" / f"shapeworld_{split}.tsv")
        assert len(data.rows) == n and data.skipped == []
    viper(["world", "data", "--out", str(tmp_path / "d"), "--n", "10", "--size", "56", "--vocab_size", "500",
           "--tokenizer_scenes", "60", "--weights", "choose=0,compare=0"])
    manifest = records.read_manifest(tmp_path / "d" / "base_data")
    assert manifest["num_records"] == 10 and set(manifest["kinds"]) <= {"describe", "ask"}
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "d" / "tokenizer"))) == 500
    report = json.loads((tmp_path / "d" / "tokenizer_report.json").read_text())
    assert report["ratio"] > 3
    with pytest.raises(SystemExit, match="kinds are"):
        viper(["world", "data", "--out", str(tmp_path / "y"), "--n", "3", "--weights", "chose=0"])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write"):
        viper(["world", "bench", "--out", str(tmp_path / "file"), "--n_per_category", "1"])
    with pytest.raises(ValueError, match="benchmark split must be one of"):
        bench.write_benchmark(tmp_path / "z", "base_train", 1)
    with pytest.raises(SystemExit, match="--n_per_category must be >= 1"):
        viper(["world", "bench", "--out", str(tmp_path / "x"), "--n_per_category", "0"])


def test_compare_lists_write_the_difference_as_a_list_line():
    """compare_lists=True: some compare examples ask for the differences as "- " lines and get the change's
    sentence as one; off (the default) the data is as before (no extra draw)."""
    listed = 0
    for ex in base_data.examples(200, weights={"describe": 0, "ask": 0, "compare": 1, "choose": 0},
                                 compare_lists=True):
        if ex.prompt in base_data.LIST_PROMPTS:
            body = re.search(r"<answer>(.+)</answer>", ex.answer).group(1)
            assert body.startswith("- ") and "\n" not in body and len(ex.images) == 2 and ex.images[0] != ex.images[1]
            listed += 1
    assert listed >= 15
    assert [e.answer for e in base_data.examples(40)] == [e.answer for e in base_data.examples(40, compare_lists=False)]


def test_compare_modes_choose_the_two_image_questions():
    """compare_modes: only the named questions, weighted by repetition; the same image twice is answered yes,
    any other pair no; None is today's mix (the same examples), an unknown mode is refused."""
    only_compare = {"describe": 0, "ask": 0, "compare": 1, "choose": 0}
    same_q = ("Are these two images the same?", "Do the two images show the same thing?")
    yes = 0
    exs = list(base_data.examples(120, weights=only_compare, compare_modes=("same", "same", "other_scene")))
    for ex in exs:
        assert ex.prompt in same_q and len(ex.images) == 2
        answer = re.search(r"<answer>(.+)</answer>", ex.answer).group(1)
        assert answer.startswith("Yes") == (ex.images[0] == ex.images[1])
        yes += answer.startswith("Yes")
    assert 60 <= yes <= 100  # two of three draws
    assert [e.answer for e in base_data.examples(40, weights=only_compare, compare_lists=True)] == [
        e.answer for e in base_data.examples(40, weights=only_compare, compare_modes=base_data.COMPARE_MODES + ("list",))]
    with pytest.raises(ValueError, match="compare_modes must be"):
        next(base_data.examples(1, weights=only_compare, compare_modes=("sam",)))
