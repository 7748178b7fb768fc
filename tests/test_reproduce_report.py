"""The experiment driver of issue 18: aggregation (viper_jax/world/report.py) on hand-made `viper eval` JSONs and
metrics.jsonl files, and the plan (viper_jax/world/reproduce.py): its command lines parse through the real config
schemas, and a step is skipped when its output exists (resume), written under .partial and renamed."""

from __future__ import annotations

import io
import json
import shlex
import sys
from pathlib import Path

import pytest

from viper_jax.world import report
from viper_jax.world.reproduce import Plan, Settings, Step, _tuple, quick_settings

CATS = ("coarse", "fine", "hallucination")


def _file(preds):
    """A split of a viper eval JSON, scored as FileResult.to_dict scores it."""
    from viper_jax.evaluation import answers

    overall, per = answers.score(preds)
    return {"overall": overall.to_dict(), "categories": {k: v.to_dict() for k, v in per.items()}, "predictions": preds}


def _preds(correct: dict[str, int], n: int = 10, yes_to_absent: int = 0):
    """n questions per category, `correct[cat]` of them right; hallucination: half absent ('no'), of which
    `yes_to_absent` are answered yes (wrong), the present ones all right."""
    out = []
    for cat in CATS:
        for i in range(n):
            if cat == "hallucination":
                answer = "no" if i < n // 2 else "yes"
                extracted = ("yes" if i < yes_to_absent else "no") if answer == "no" else "yes"
            else:
                answer = "A"
                extracted = "A" if i < correct[cat] else "B"
            out.append({"index": f"{cat}-{i}", "category": cat, "kind": "yes_no" if cat == "hallucination" else "mcq",
                        "answer": answer, "response": f"<think></think><answer>{extracted}</answer>",
                        "extracted": extracted, "correct": extracted == answer, "formatted": True,
                        "chance": 0.5 if cat == "hallucination" else 0.25})
    return out


def _eval_json(path: Path, val: dict[str, int], test: dict[str, int], yes_val=0, yes_test=0) -> Path:
    data = {"model": "m", "settings": {}, "files": {"shapeworld_val": _file(_preds(val, yes_to_absent=yes_val)),
                                                     "shapeworld_test": _file(_preds(test, yes_to_absent=yes_test))}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _metrics(path: Path, stages=("caption_refine", "visual_ops"), steps=3, step_s=2.0, reward0=0.2) -> Path:
    rows, step = [], 0
    for stage in stages:
        for k in range(1, steps + 1):
            step += 1
            row = {"step": step, "stage": stage, "stage_step": k, "reward/mean": reward0 + 0.1 * k,
                   "format_rate": 0.5 + 0.1 * k, "time/step_s": step_s}
            if step == 1:
                row.update({"first_step_seconds": 30.0, "time/step_s": 25.0})
            rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "rew')  # a cut-short last line
    return path


# ------------------------------------------------------------------------------------------------ eval files

def test_summarize_eval_and_hallucination_rate(tmp_path):
    p = _eval_json(tmp_path / "e.json", {"coarse": 5, "fine": 2, "hallucination": 0},
                   {"coarse": 8, "fine": 4, "hallucination": 0}, yes_val=1, yes_test=3)
    s = report.summarize_eval(p)
    assert set(s) == {"val", "test"}
    t = s["test"]
    assert list(t["categories"]) == ["coarse", "fine", "hallucination"]  # the benchmark's order
    assert t["categories"]["coarse"] == pytest.approx(0.8) and t["categories"]["fine"] == pytest.approx(0.4)
    assert t["categories"]["hallucination"] == pytest.approx(0.7)  # 3 of 10 wrong: yes to absent objects
    assert t["hallucination_rate"] == pytest.approx(3 / 5)  # of the 5 absent objects, 3 got 'yes'
    assert t["average"] == pytest.approx((0.8 + 0.4 + 0.7) / 3)
    assert t["accuracy"] == pytest.approx(19 / 30) and t["questions"] == 30
    assert s["val"]["hallucination_rate"] == pytest.approx(1 / 5)
    assert report.hallucination_rate([{"category": "fine", "answer": "A", "extracted": "A"}]) is None
    assert report.split_name("shapeworld_val") == "val" and report.split_name("other") == "other"


def test_seconds_per_step_and_curves(tmp_path):
    rows = report.read_jsonl(_metrics(tmp_path / "m.jsonl"))
    assert len(rows) == 6  # the cut-short line dropped
    assert report.seconds_per_step(rows) == pytest.approx(2.0)  # the first (compiling) step left out
    sft = [{"step": 1, "seconds": 9.0, "first_step_seconds": 9.0}, {"step": 2, "seconds": 1.0}, {"step": 3, "seconds": 3.0}]
    assert report.seconds_per_step(sft, "sft") == pytest.approx(2.0)
    assert report.seconds_per_step([{"step": 1, "time/step_s": 4.0, "first_step_seconds": 4.0}]) == 4.0
    c = report.curves(rows)
    assert list(c) == ["caption_refine", "visual_ops"]
    assert c["visual_ops"]["step"] == [1, 2, 3]
    assert c["caption_refine"]["reward"] == pytest.approx([0.3, 0.4, 0.5])
    assert report.read_jsonl(tmp_path / "missing.jsonl") == []


# ------------------------------------------------------------------------------------------------ rows, table

def _specs(tmp_path):
    """base; 2 seeds x 2 viper rounds; an SFT and a shuffled control per seed."""
    e, specs = tmp_path / "eval", []
    _eval_json(e / "base.json", {"coarse": 5, "fine": 3, "hallucination": 7}, {"coarse": 5, "fine": 3, "hallucination": 7},
               2, 2)
    specs.append({"name": "base", "kind": "base", "seed": None, "eval": str(e / "base.json"), "metrics": None})
    for seed in (0, 1):
        # round 1 is better on val for seed 0, round 0 for seed 1; test follows
        for r, (v, t) in enumerate([((6, 4), (6, 4 + seed)), ((7 - 2 * seed, 5), (7, 6))]):
            name = f"viper_s{seed}_r{r}"
            _eval_json(e / f"{name}.json", {"coarse": v[0], "fine": v[1], "hallucination": 8},
                       {"coarse": t[0], "fine": t[1], "hallucination": 8}, 1, 1)
            m = _metrics(tmp_path / name / "metrics.jsonl", step_s=1.0 + seed)
            specs.append({"name": name, "kind": f"viper round {r}", "seed": seed, "round": r, "eval": str(e / f"{name}.json"),
                          "metrics": str(m), "trainer": "grpo"})
        _eval_json(e / f"sft_s{seed}.json", {"coarse": 5, "fine": 3, "hallucination": 6},
                   {"coarse": 5, "fine": 3 + seed, "hallucination": 6}, 3, 3)
        specs.append({"name": f"sft_s{seed}", "kind": "sft", "seed": seed, "eval": str(e / f"sft_s{seed}.json"),
                      "metrics": None, "trainer": "sft"})
        specs.append({"name": f"shuffled_s{seed}", "kind": "shuffled", "seed": seed,
                      "eval": str(e / f"shuffled_s{seed}.json"), "metrics": None})  # not evaluated (yet)
    return specs


def test_rows_best_round_and_table(tmp_path):
    specs = _specs(tmp_path)
    rows = [r for r in map(report.model_row, specs) if r is not None]
    assert len(rows) == 7  # the shuffled controls have no eval JSON
    r = next(x for x in rows if x["name"] == "viper_s1_r0")
    assert r["seconds_per_step"] == pytest.approx(2.0) and r["train_steps"] == 6
    assert r["average"] == pytest.approx(r["test"]["average"])
    best = report.best_rounds(rows)
    assert best[0]["name"] == "viper_s0_r1" and best[1]["name"] == "viper_s1_r0"  # chosen on val
    table = report.group_rows(rows, "test")
    kinds = [t["kind"] for t in table]
    assert kinds == ["base", "sft", "viper round 0", "viper round 1", "viper best"]
    fine = {t["kind"]: t["cells"]["fine"] for t in table}
    assert fine["base"] == (pytest.approx(0.3), None)  # one model: no std
    assert fine["viper round 0"][0] == pytest.approx(0.45) and fine["viper round 0"][1] == pytest.approx(0.0707, abs=1e-3)
    assert fine["viper best"][0] == pytest.approx((0.6 + 0.5) / 2)  # s0 round 1 (test 6), s1 round 0 (test 5)
    md = report.table_markdown(table)
    assert "| model | coarse | fine | hallucination | average | halluc. rate | n |" in md
    assert "| ViPER, best round by val | 65.0 ± 7.1 | 55.0 ± 7.1 |" in md
    assert "| base | 50.0 | 30.0 | 80.0 |" in md  # 2 of 5 absent objects answered yes


def test_goals_are_paired_per_seed(tmp_path):
    rows = [r for r in map(report.model_row, _specs(tmp_path)) if r is not None]
    g = {x["goal"].split(" (")[0]: x for x in report.goals(rows)}
    fine = g["ViPER best - base, fine"]
    assert fine["deltas"] == {"0": pytest.approx(0.3), "1": pytest.approx(0.2)} and fine["met_seeds"] == 2
    hall = g["ViPER best - base, hallucination rate"]
    assert hall["deltas"]["0"] == pytest.approx(0.2 - 0.4) and hall["met_seeds"] == 2
    assert g["ViPER best - SFT control, average"]["seeds"] == 2
    assert g["ViPER best - stage 1 only, average"]["seeds"] == 0  # no stage-1 control in this run
    assert "not measured" in report.goals_markdown(report.goals(rows))


def test_build_report_writes_results_report_and_curves(tmp_path):
    specs = _specs(tmp_path)
    runs = {"curves_seed0": {"viper round 0": str(tmp_path / "viper_s0_r0" / "metrics.jsonl"),
                             "stage1": str(_metrics(tmp_path / "st1.jsonl", stages=("caption_refine",), steps=6)),
                             "absent": str(tmp_path / "nothing.jsonl")}}
    out = report.build_report(tmp_path / "work", specs, {"seeds": [0, 1]}, curve_runs=runs)
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert len(results["rows"]) == 7 and results["missing"] == ["shuffled_s0", "shuffled_s1"]
    assert results["best_rounds_by_val"] == {"0": "viper_s0_r1", "1": "viper_s1_r0"}
    assert {r["kind"] for r in results["rows"]} == {"base", "sft", "viper round 0", "viper round 1"}
    row = results["rows"][1]
    assert set(row) >= {"name", "kind", "seed", "val", "test", "average", "hallucination_rate", "seconds_per_step"}
    md = (tmp_path / "work" / "report.md").read_text()
    assert "## Test" in md and "## Validation" in md and "## Goals" in md and "shuffled_s0" in md
    assert (tmp_path / "work" / "report" / "curves_seed0.png").stat().st_size > 1000
    assert "report/curves_seed0.png" in md
    assert out["goals"]


def test_grpo_signal_table_and_the_no_signal_line(tmp_path):
    rows = [{"step": 1, "reward/mean": 0.2, "format_rate": 0.5, "groups/zero_spread_rate": 0.5,
             "response_length/mean": 10.0},
            {"step": 2, "reward/mean": 0.4, "format_rate": 1.0, "groups/zero_spread_rate": 0.0,
             "response_length/mean": 20.0}]
    g = report.grpo_signal(rows)
    assert g == pytest.approx({"reward": 0.3, "format_rate": 0.75, "zero_spread": 0.25, "response_tokens": 15.0,
                               "no_signal": False})
    assert report.grpo_signal([{"step": 1, "loss": 1.0}]) is None  # an SFT run's rows
    flat = [{"step": k, "reward/mean": 0.0, "format_rate": 0.0, "groups/zero_spread_rate": 1.0,
             "response_length/mean": 6.0} for k in (1, 2, 3)]
    assert report.grpo_signal(flat)["no_signal"] is True
    specs = _specs(tmp_path)
    flat_path = tmp_path / "flat.jsonl"
    flat_path.write_text("".join(json.dumps(r) + "\n" for r in flat))
    specs[1]["metrics"] = str(flat_path)  # viper_s0_r0 learned nothing
    report.build_report(tmp_path / "work", specs)
    md = (tmp_path / "work" / "report.md").read_text()
    assert "| viper_s0_r0 | 0.000 | 0.00 | 100% | 6.0 |" in md
    assert "**No learning signal:** every group had the same reward at every step in viper_s0_r0," in md


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_examples_from_bench_and_synth(tmp_path):
    import base64
    import csv

    from viper_common import records as rec

    tsv = tmp_path / "shapeworld_test.tsv"
    with tsv.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "answer", "category", "image"])
        for i in range(3):
            images = repr([base64.b64encode(_png(i)).decode(), base64.b64encode(_png(100 + i)).decode()])
            w.writerow([f"q{i}", f"What changed {i}?", "red", "blue", "A", "multi_image", images])
    def preds(right):
        return {"files": {"shapeworld_test": {"predictions": [
            {"index": f"q{i}", "category": "multi_image", "answer": "A", "response": "A" if ok else "B",
             "extracted": "A" if ok else "B", "correct": ok} for i, ok in enumerate(right)]}}}
    (tmp_path / "a.json").write_text(json.dumps(preds([False, True, True])))
    (tmp_path / "b.json").write_text(json.dumps(preds([True, True, False])))
    ex = report.bench_examples(tmp_path / "a.json", tmp_path / "b.json", tsv, tmp_path / "ex")
    assert [e["index"] for e in ex] == ["q0", "q2"]  # fixed first, then broken
    assert ex[0]["before"] == "B" and ex[0]["after"] == "A" and Path(ex[0]["image"]).exists()
    synth = tmp_path / "synth"
    rec.write_shard(synth / "visual_ops-00000-of-00001" / "part-00000.arrayrecord",
                    [rec.ViperRecord(id="o1", task="visual_ops", images=(_png(1), _png(2)), truth=("Remove the star.",))])
    s = report.synth_examples(synth, tmp_path / "ex")
    assert s == [{"task": "visual_ops", "id": "o1", "caption": None, "truth": ["Remove the star."],
                  "image": str(tmp_path / "ex" / "visual_ops_o1.png")}]
    md = report.examples_markdown(ex, s, tmp_path)
    assert "![](ex/test_q0.png)" in md and "Remove the star." in md


# ------------------------------------------------------------------------------------------------ the plan

def _flags(cmd, first):
    return [a for a in cmd[cmd.index(first):] if a.startswith("--config.")]


def test_plan_commands_parse_through_the_real_schemas(tmp_path):
    from viper_jax.loop.config import load_config as loop_config
    from viper_jax.sft import config as sft_config
    from viper_jax.train import config as train_config

    s = Settings(workdir=tmp_path / "w", seeds=(0, 3), rounds=2)
    plan = Plan(s, viper=["viper"])
    names = [st.name for st in plan.steps]
    assert names[:5] == ["base", "bench", "images_r0", "images_r1", "eval_base"]
    for seed in (0, 3):
        for n in ("loop", "sft", "stage1_train", "stage1_export", "stage2_train", "shuffle_truth", "shuffled_train",
                  "eval_viper", "eval_sft", "eval_stage1", "eval_stage2", "eval_shuffled"):
            assert any(x.startswith(n) and x.endswith(f"s{seed}") or x.startswith(f"{n}_s{seed}") for x in names), n
    steps = {st.name: st for st in plan.steps}
    w = (tmp_path / "w").absolute()
    # viper loop: rounds, base, and the tuple-valued overrides carry the seed
    loop = steps["loop_s3"].cmd
    c = loop_config(s.loop_config, _flags(loop, "loop"))
    assert c.rounds == 2 and c.models.vlm == str(w / "base" / "base_hf")
    assert c.train.overrides == ("--config.seed=3",) and c.synth.overrides == ("--config.seed=3",)
    assert loop[loop.index("--images") + 1] == str(w / "images" / "round_{round}")
    # the stage-2-only control: one stage with the whole budget, round 0's records of its seed
    cmd = steps["stage2_train_s3"].cmd
    t = train_config.load_config(s.grpo_config)
    train_config.apply_overrides(t, _flags(cmd, "train"))
    t.workdir = cmd[cmd.index("--workdir") + 1]
    train_config.validate(t)
    assert t.stage_order == ("visual_ops",) and t.stages.visual_ops.steps == 24 and t.seed == 3
    assert t.stages.visual_ops.data_globs == (str(w / "viper_seed3" / "round_000" / "synth" / "visual_ops-*" /
                                                  "part-*.arrayrecord"),)
    assert t.model.path == t.model.tokenizer_path == str(w / "base" / "base_hf")
    # the shuffled control trains both stages on the shuffled copy
    t = train_config.load_config(s.grpo_config)
    train_config.apply_overrides(t, _flags(steps["shuffled_train_s0"].cmd, "train"))
    assert t.stage_order == ("caption_refine", "visual_ops") and t.stages.caption_refine.steps == 12
    assert t.stages.caption_refine.data_globs[0].startswith(str(w / "controls" / "seed0" / "shuffled" / "synth"))
    # the SFT control: the GRPO budget (24 updates of 8 prompts), both tasks, export to a partial folder
    cmd = steps["sft_s0"].cmd
    c = sft_config.load_config(s.sft_config)
    sft_config.apply_overrides(c, _flags(cmd, "sft"))
    c.workdir = cmd[cmd.index("--workdir") + 1]
    sft_config.validate(c)
    assert c.steps == 24 and c.data.batch_size == 8 and len(c.data.shard_globs) == 2
    assert c.export.hf_dir.endswith("export.partial") and steps["sft_s0"].done == w / "controls" / "seed0" / "sft" / "export"
    ev = steps["eval_viper_s0_r1"].cmd
    assert ev[:3] == ["viper", "eval", "--model"] and ev[3] == str(w / "viper_seed0" / "round_001" / "export")
    assert ev.count("--tsv") == 2 and "12544" in ev and "128,192" in ev
    assert [sp["kind"] for sp in plan.specs][:3] == ["base", "viper round 0", "viper round 1"]


def test_quick_plan_and_existing_base(tmp_path):
    s = quick_settings(tmp_path / "q")
    s.base_hf = tmp_path / "mybase"
    plan = Plan(s, viper=["viper"])
    names = [st.name for st in plan.steps]
    assert "base" not in names and not any(n.startswith("sft") for n in names)
    loop = next(st for st in plan.steps if st.name == "loop_s0").cmd
    assert any("stages.caption_refine.steps=3" in a for a in loop)
    assert plan.steps[names.index("bench")].cmd[-4:] == ["--n_per_category", "40", "--val_per_category", "20"]
    assert all(str(tmp_path / "mybase") in " ".join(st.cmd) for st in plan.steps if st.name.endswith("train_s0"))
    assert _tuple(["a"]) == '("a",)' and _tuple([]) == "()"


def test_train_override_reaches_every_grpo_run_alike(tmp_path):
    from viper_jax.loop.config import load_config as loop_config
    from viper_jax.train import config as train_config
    from viper_jax.world.reproduce_cli import parse_args, settings_from_args

    s = settings_from_args(parse_args(["--quick", "--workdir", str(tmp_path / "q"), "--train_override",
                                       "reward.matcher=shapeworld", "--train_override", "rl.group_size=4"]))
    steps = {st.name: st for st in Plan(s, viper=["viper"]).steps}
    c = loop_config(s.loop_config, _flags(steps["loop_s0"].cmd, "loop"))
    assert c.train.overrides[:3] == ("--config.seed=0", "--config.reward.matcher=shapeworld", "--config.rl.group_size=4")
    for name in ("stage1_train_s0", "stage2_train_s0", "shuffled_train_s0"):
        t = train_config.load_config(s.grpo_config)
        train_config.apply_overrides(t, _flags(steps[name].cmd, "train"))
        assert t.reward.matcher == "shapeworld" and t.rl.group_size == 4, name
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        settings_from_args(parse_args(["--quick", "--train_override", "reward.matcher"]))


def test_run_skips_done_steps_renames_partials_and_blocks_dependents(tmp_path):
    plan = Plan(Settings(workdir=tmp_path / "w", seeds=(0,), rounds=1, controls=()), viper=["viper"])
    py = sys.executable
    out, marker = tmp_path / "w" / "a", tmp_path / "w" / "b" / "DONE"
    plan.steps = [
        Step("a", [py, "-c", f"import os; os.makedirs({str(out) + '.partial'!r})"], out, partial=Path(str(out) + ".partial")),
        Step("b", [py, "-c", "print('hi')"], marker, mark=True, needs=("a",)),
        Step("c", [py, "-c", "raise SystemExit(3)"], tmp_path / "w" / "c"),
        Step("d", [py, "-c", "print(1)"], tmp_path / "w" / "d", needs=("c",)),
        Step("e", [py, "-c", "print(1)"], tmp_path / "w" / "e", requires=(str(tmp_path / "nothing-*"),)),
    ]
    said = []
    states = plan.run(say=said.append, echo=False)
    assert states == {"a": "ran", "b": "ran", "c": "failed", "d": "skipped", "e": "skipped"}
    assert out.is_dir() and not Path(str(out) + ".partial").exists() and marker.exists()
    record = json.loads((tmp_path / "w" / "steps.json").read_text())
    assert record["a"]["state"] == "done" and record["c"]["state"] == "failed"
    assert "a $ " in said[0] or said[0].startswith("[a] $ ")
    assert (tmp_path / "w" / "logs" / "c.log").exists()
    again = plan.run(say=said.append, echo=False)  # resume: what is done is not rerun
    assert again["a"] == again["b"] == "done" and again["c"] == "failed"
    assert shlex.split(plan.commands()[0])[0] == py


def test_single_stage_order_passes_train_validation():
    """The stage-only controls use stage_order (a stage not listed is neither validated nor run)."""
    from viper_jax.train import config as train_config

    c = train_config.base_config()
    c.workdir, c.model.path = "/w", "/m"
    c.stage_order = ("visual_ops",)
    c.stages.caption_refine.data_globs = ()
    c.stages.caption_refine.steps = 0
    train_config.validate(c)


def test_controls_wait_for_round_0_synthesis_and_evals_for_their_model(tmp_path):
    from viper_jax.world import reproduce

    plan = Plan(Settings(workdir=tmp_path / "w", seeds=(0,), rounds=1), viper=["viper"])
    steps = {st.name: st for st in plan.steps}
    rd = tmp_path / "w" / "viper_seed0" / "round_000"
    assert steps["stage1_train_s0"].ready() is False and "round 0 synthesis" in steps["stage1_train_s0"].ready_text
    rd.mkdir(parents=True)
    (rd / "status.json").write_text(json.dumps({"steps": {"synth_caption_refine": {"state": "done"},
                                                          "synth_visual_ops": {"state": "running"}}}))
    assert not reproduce._synth_done(rd)
    (rd / "status.json").write_text(json.dumps({"steps": {"synth_caption_refine": {"state": "done"},
                                                          "synth_visual_ops": {"state": "done"}}}))
    assert steps["sft_s0"].ready() and steps["shuffle_truth_s0"].ready()
    assert steps["eval_viper_s0_r0"].requires == (str(rd / "export" / "config.json"),)
    assert steps["eval_viper_s0_r0"].needs == ("bench",)


def test_quick_shares_the_full_runs_base(tmp_path, monkeypatch):
    from viper_jax.world.reproduce_cli import parse_args, settings_from_args

    monkeypatch.chdir(tmp_path)
    plan = Plan(settings_from_args(parse_args(["--quick"])), viper=["viper"])
    assert plan.w == tmp_path / "runs" / "reproduce_quick"
    assert plan.base == tmp_path / "runs" / "reproduce" / "base" / "base_hf"
    assert plan.steps[0].cmd[:5] == ["viper", "world", "base", "--workdir", str(tmp_path / "runs" / "reproduce" / "base")]
    full = Plan(settings_from_args(parse_args(["--seeds", "4,5", "--rounds", "3", "--controls", "sft,shuffled"])),
                viper=["viper"])
    assert full.base == tmp_path / "runs" / "reproduce" / "base" / "base_hf" and full.s.seeds == (4, 5)
    assert full.s.steps == {"caption_refine": 12, "visual_ops": 12} and full.s.prompts_per_step == 8
    names = [st.name for st in full.steps]
    assert "stage1_train_s4" not in names and "shuffled_train_s5" in names and "eval_viper_s5_r2" in names
    with pytest.raises(SystemExit, match="unknown"):
        settings_from_args(parse_args(["--controls", "sft,bogus"]))


def test_option_scoring_gets_its_own_splits_best_rounds_and_goals(tmp_path):
    """A viper eval JSON with option_scoring (--score_options) gives 'val_options' / 'test_options' splits built from
    the option choices; the best round for them is chosen on val_options, and the report has their tables."""
    def with_options(path: Path, val: dict[str, int], test: dict[str, int]) -> None:
        data = json.loads(path.read_text())
        for key, right in (("shapeworld_val", val), ("shapeworld_test", test)):
            f = data["files"][key]
            scored = _file(_preds(right))
            for p, q in zip(f["predictions"], scored["predictions"]):
                p.update(option_choice=q["extracted"], option_correct=q["correct"], option_logprobs={},
                         forced_prefix=False)
            f["option_scoring"] = {"overall": scored["overall"], "categories": scored["categories"], "forced_prefix": 0}
        path.write_text(json.dumps(data))

    specs = [s for s in _specs(tmp_path) if s["kind"] in ("base", "viper round 0", "viper round 1")]
    for s in specs:  # by likelihood, round 0 is the better one on val for both seeds (generation: see _specs)
        good = s["kind"] == "viper round 0"
        with_options(Path(s["eval"]), {"coarse": 9 if good else 6, "fine": 4, "hallucination": 5},
                     {"coarse": 8 if good else 5, "fine": 4, "hallucination": 5})
    rows = [report.model_row(s) for s in specs]
    base = rows[0]
    assert base["test_options"]["categories"]["coarse"] == pytest.approx(0.5)
    assert base["test"]["categories"]["coarse"] == pytest.approx(0.5)  # generation is unchanged
    assert {k: v["name"] for k, v in report.best_rounds(rows, "val_options").items()} == \
        {0: "viper_s0_r0", 1: "viper_s1_r0"}
    g = {x["goal"].split(" (")[0]: x for x in report.goals(rows, "test_options")}
    assert g["ViPER best - base, average"]["deltas"] == {"0": pytest.approx(0.1), "1": pytest.approx(0.1)}
    results = report.build_report(tmp_path / "work", specs, {})
    assert results["goals_options_by_likelihood"]
    assert "## Options by likelihood" in (tmp_path / "work" / "report.md").read_text()
