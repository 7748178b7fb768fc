"""One config-file loader for every command (viper_common.config_overrides.load_config_file): `viper train`,
`viper loop`, `viper-synth`, `viper sft` and `viper world base` refuse a key their schema lacks, naming it and
its closest match, and a missing file or one without get_config() is a ConfigError naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from viper_common.config_overrides import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _loaders():
    from synthesis_torch.config import load_config as synth
    from viper_jax.loop.config import load_config as loop
    from viper_jax.sft.config import load_config as sft
    from viper_jax.train.config import load_config as train
    from viper_jax.world.base import load_config as world

    return {"train": ("viper_jax.train.config", "c.optim.learnin_rate = 1e-5", train, r"'optim.learnin_rate'.*learning_rate"),
            "loop": ("viper_jax.loop.config", "c.synth.num_shard = 2", loop, r"'synth.num_shard'.*num_shards"),
            "synth": ("synthesis_torch.config", "c.t2i.stepz = 8", synth, r"'t2i.stepz'.*steps"),
            "sft": ("viper_jax.sft.config", "c.sft.thinkk = 'x'", sft, r"'sft.thinkk'.*think"),
            "world": ("viper_jax.world.base", "c.world.n_trian = 5", world, r"'world.n_trian'.*n_train")}


@pytest.mark.parametrize("command", ["train", "loop", "synth", "sft", "world"])
def test_unknown_key_in_a_config_file_is_refused(tmp_path, command):
    module, typo, load, culprit = _loaders()[command]
    schema = "default_config" if command == "synth" else "base_config"
    path = tmp_path / f"{command}_typo.py"
    path.write_text(f"from {module} import {schema}\n\ndef get_config():\n    c = {schema}()\n    {typo}\n    return c\n")
    with pytest.raises(ConfigError, match=culprit):
        load(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no get_config"):
        load(str(tmp_path / "empty.py"))


def test_viper_synth_names_the_unknown_key(tmp_path):
    """From the command line: the message and exit status, no traceback."""
    path = tmp_path / "typo.py"
    path.write_text("from synthesis_torch.config import default_config\n\ndef get_config():\n"
                    "    c = default_config()\n    c.t2i.stepz = 8\n    return c\n")
    done = subprocess.run([sys.executable, "-m", "synthesis_torch", "caption-refine", "--images", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--config", str(path)], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "viper-synth: unknown config key 't2i.stepz'; did you mean steps" in done.stderr, done.stderr
