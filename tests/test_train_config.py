"""Trainer configuration and refusals: unknown keys (file, override, command line), typed overrides,
impossible values, a stage without data, and a checkpoint of a different model, each named."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

from grpo_tiny import TINY_CONFIG, tiny_config
from viper_jax.cli import main as viper
from viper_jax.train.config import ConfigError, apply_overrides, base_config, load_config, validate


def test_configs_load_and_validate(tmp_path):
    for name, group, prompts in (("tiny", 4, 4), ("qwen2_5_vl_3b", 5, 128), ("qwen2_5_vl_7b", 5, 128)):
        c = load_config(TINY_CONFIG.with_name(f"{name}.py"))
        c.workdir = str(tmp_path)
        validate(c)
        assert (c.rl.group_size, c.rl.prompts_per_step) == (group, prompts)
        assert tuple(c.stage_order) == ("caption_refine", "visual_ops")
    seven = load_config(TINY_CONFIG.with_name("qwen2_5_vl_7b.py"))
    assert (seven.rollout.temperature, seven.rl.kl_coef, seven.rl.eps_low, seven.rl.eps_high) == (1.0, 0.0, 0.2, 0.28)
    assert (seven.optim.learning_rate, seven.optim.weight_decay, seven.optim.grad_clip) == (1e-6, 0.01, 1.0)


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_paper_configs_name_the_papers_loss_and_reward(tmp_path, name):
    """The paper's per-sample normalisation ((1/G) sum_i 1/|o_i| sum_t) and BGE-M3 at tau 0.85, by a local path;
    that path absent stops the stage at its start (the reward is built), naming the key."""
    from viper_jax.rl.reward import EmbeddingModelMissingError, RewardDependencyError, get_reward

    c = load_config(TINY_CONFIG.with_name(f"{name}.py"))
    assert c.rl.aggregation == "seq-mean-token-mean"
    assert c.reward.tau == 0.85 and "bge-m3" in c.reward.embedding_model.lower()
    c.reward.embedding_model = str(tmp_path / "no-bge-m3")
    for stage in c.stage_order:
        with pytest.raises(EmbeddingModelMissingError, match=r"config reward\.embedding_model: .*no-bge-m3"):
            get_reward(c.stages[stage].reward, c.reward)
    assert issubclass(EmbeddingModelMissingError, RewardDependencyError)


def test_overrides_are_typed():
    c = base_config()
    apply_overrides(c, ["--config.rl.group_size=8", "--config.rl.drop_zero_spread=true", "--config.optim.learning_rate",
                        "2e-6", "--config.stages.caption_refine.data_globs=/d/*.arrayrecord",
                        "--config.stage_order=('visual_ops',)", "--config.mesh.tensor=2"])
    assert c.rl.group_size == 8 and isinstance(c.rl.group_size, int)
    assert c.rl.drop_zero_spread is True and c.optim.learning_rate == 2e-6
    assert c.stages.caption_refine.data_globs == ("/d/*.arrayrecord",)
    assert c.stage_order == ("visual_ops",) and c.mesh.tensor == 2
    with pytest.raises(ConfigError, match=r"--config.rl.group_size: expected int, got 'eight'"):
        apply_overrides(c, ["--config.rl.group_size=eight"])


@pytest.mark.parametrize("flag,culprit", [("--config.rl.grup_size=8", r"'rl.grup_size'.*did you mean group_size"),
                                          ("--config.rll.group_size=8", r"'rll'"),
                                          ("--config.stages.caption_refine.stepz=3", r"'stages.caption_refine.stepz'"),
                                          ("--bogus=1", r"'--bogus=1'")])
def test_unknown_override_is_refused(flag, culprit):
    with pytest.raises(ConfigError, match=culprit):
        apply_overrides(base_config(), [flag])


def test_unknown_key_in_config_file_is_refused(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from viper_jax.train.config import base_config\n\ndef get_config():\n"
                    "    c = base_config()\n    c.optim.learnin_rate = 1e-5\n    return c\n")
    with pytest.raises(ConfigError, match=r"'optim.learnin_rate'.*learning_rate"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'rl.grup_size'"):  # through `viper train` as well
        viper(["train", "--config", str(TINY_CONFIG), "--workdir", str(tmp_path / "w"), "--config.rl.grup_size=8"])
    with pytest.raises(SystemExit):  # other sub-commands take no overrides
        viper(["convert", "hf-to-orbax", "--hf_dir", "x", "--out", "y", "--config.rl.group_size=8"])


@pytest.mark.parametrize("flag,culprit", [("--config.rl.group_size=1", "rl.group_size"),
                                          ("--config.rl.num_minibatches=3", "rl.num_minibatches"),
                                          ("--config.rl.aggregation=sum", "rl.aggregation"),
                                          ("--config.rl.kl_estimator=k4", "rl.kl_estimator"),
                                          ("--config.reward.matcher=bleu", "reward.matcher"),
                                          ("--config.model.remat=everything", "model.remat.*offload"),
                                          ("--config.stage_order=('caption_refine','vop')", "stage 'vop'"),
                                          ("--config.stages.visual_ops.data_globs=()", "stages.visual_ops.data_globs")])
def test_impossible_values_are_refused(tmp_path, flag, culprit):
    c = tiny_config(tmp_path, tmp_path)
    apply_overrides(c, [flag])
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(")):
        validate(c)


@pytest.mark.parametrize("remat", ["none", "full", "dots", "offload"])
def test_every_remat_policy_of_the_model_is_accepted(tmp_path, remat):
    """The trainer takes every policy layers.remat_policy implements (their gradients agree: test_plan.py)."""
    from viper_jax.models.qwen2_5_vl.layers import remat_policy

    c = tiny_config(tmp_path, tmp_path)
    apply_overrides(c, [f"--config.model.remat={remat}"])
    validate(c)
    remat_policy(c.model.remat)


def test_stage_without_data_is_refused(tmp_path):
    from viper_common import records
    from viper_jax.tiny import write_tiny_records
    from viper_jax.train.trainer import train

    write_tiny_records(tmp_path / "data", per_task=2)
    with pytest.raises(ConfigError, match=r"stage 'visual_ops' has no data: shard glob .*nothing.*matches no file"):
        train(tiny_config(tmp_path / "w", tmp_path / "data",
                          [f"--config.stages.visual_ops.data_globs={tmp_path}/nothing/*.arrayrecord"]))
    records.write_shard(tmp_path / "empty" / "part-00000.arrayrecord", [])
    with pytest.raises(ConfigError, match=r"stage 'caption_refine' has no data: its 1 shard\(s\) hold no records"):
        train(tiny_config(tmp_path / "w", tmp_path / "data",
                          [f"--config.stages.caption_refine.data_globs={tmp_path}/empty/*.arrayrecord"]))
    with pytest.raises(ConfigError, match=r"stage 'visual_ops' \(task 'visual_ops'\) read record 'csr-"):
        train(tiny_config(tmp_path / "w2", tmp_path / "data", [
            "--config.stage_order=('visual_ops',)",
            f"--config.stages.visual_ops.data_globs={tmp_path}/data/caption_refine-*/*.arrayrecord"]))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from viper_common.tiny_tokenizer import build_tiny_tokenizer
    from viper_jax.checkpoint import TrainCheckpointer
    from viper_jax.tiny import tiny_model_config
    from viper_jax.tiny import write_tiny_records
    from viper_jax.train.trainer import ModelMismatchError, train

    write_tiny_records(tmp_path / "data", per_task=2)
    other = tiny_model_config(build_tiny_tokenizer(), hidden=32)
    ckpt = TrainCheckpointer(tmp_path / "w" / "checkpoints", keep=2, async_save=False)
    ckpt.save(2, params={"x": jnp.zeros(2)}, opt_state={"y": jnp.zeros(1)}, model_config=other.to_hf_dict(),
              meta={"step": 2}, data_state={})
    ckpt.close()
    with pytest.raises(ModelMismatchError, match=r"checkpoints/2 was written for a different model than "
                                                 r"model.path=.*tiny_model: text.hidden_size: checkpoint 32, "
                                                 r"configured model 64"):
        train(tiny_config(tmp_path / "w", tmp_path / "data"))


def test_override_flags_round_trip_and_refuse_unknown_keys():
    """The flags `viper loop` / `viper demo` give `viper train` parse back to the values they were built from,
    and a key the schema lacks is refused when the flags are built (not in the child process)."""
    from viper_jax.train.config import override_flags

    values = {"model.path": "/m/export", "model.tiny_init": False, "rl.group_size": 4,
              "stages.visual_ops.data_globs": ("/r/synth/visual_ops-*/part-*.arrayrecord",),
              "stages.caption_refine.reward": "toy_letters"}
    flags = override_flags(values)
    assert flags[0] == "--config.model.path=/m/export" and flags[1] == "--config.model.tiny_init=False"
    config = base_config()
    apply_overrides(config, flags)
    assert {key: functools.reduce(lambda node, part: node[part], key.split("."), config) for key in values} == values
    with pytest.raises(ConfigError, match=r"'model.pth'"):
        override_flags({"model.pth": "/m"})
    with pytest.raises(ConfigError, match=r"stages.visual_ops.stepz"):
        override_flags({"stages.visual_ops.stepz": 3})


@pytest.mark.parametrize("flags,culprit", [(("--config.rl.update_prompts=3",), r"rl\.update_prompts: 3 does not divide"),
                                           (("--config.rl.update_prompts=8",), r"rl\.update_prompts: 8 does not divide"),
                                           (("--config.rl.update_prompts=-1",), r"rl\.update_prompts"),
                                           (("--config.rl.update_prompts=1", "--config.rl.num_minibatches=2"),
                                            r"rl\.num_minibatches: 2 contradicts rl\.update_prompts 1")])
def test_update_batch_must_divide_the_rollout_batch(tmp_path, flags, culprit):
    from viper_jax.train.config import minibatches_per_pass, updates_per_step

    c = tiny_config(tmp_path, tmp_path)  # 4 prompts per step, 2 minibatches
    apply_overrides(c, ["--config.rl.num_minibatches=1", *flags])
    with pytest.raises(ConfigError, match=culprit):
        validate(c)
    apply_overrides(c, ["--config.rl.num_minibatches=1", "--config.rl.update_prompts=2", "--config.rl.ppo_epochs=2"])
    validate(c)
    assert (minibatches_per_pass(c.rl), updates_per_step(c.rl)) == (2, 4)
