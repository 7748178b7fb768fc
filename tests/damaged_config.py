"""Damaged config files for tests/test_damaged_inputs.py: the `--config` files of `viper train` and
`viper-synth caption-refine` (syntax errors, a missing get_config, unknown keys, wrong types), through their
console entry points in-process."""

from __future__ import annotations

from pathlib import Path

from damaged_inputs_cases import Outcome, Shared, case, cli, console


# ------------------------------------------------------------------------------------------ config files

def _train_config(tmp: Path, body: str, *flags: str) -> tuple[Outcome, list[str]]:
    from viper_jax.cli import main

    path = tmp / "my_config.py"
    path.write_text(body)
    return cli("viper", main, ["train", "--config", str(path), "--workdir", str(tmp / "w"), *flags]), [str(path)]


GOOD = "from viper_jax.train.config import base_config\n\ndef get_config():\n    c = base_config()\n"


@case("config file (viper train)", "Python syntax error")
def _(shared: Shared, tmp: Path):
    return _train_config(tmp, GOOD + "    c.optim.learning_rate = = 3\n    return c\n")


@case("config file (viper train)", "no get_config()")
def _(shared: Shared, tmp: Path):
    return _train_config(tmp, "X = 1\n")


@case("config file (viper train)", "get_config() raises")
def _(shared: Shared, tmp: Path):
    return _train_config(tmp, GOOD + "    return c.no_such_section.x\n")


@case("config file (viper train)", "get_config() returns a dict, not a ConfigDict")
def _(shared: Shared, tmp: Path):
    return _train_config(tmp, "def get_config():\n    return {'optim': {}}\n")


@case("config file (viper train)", "unknown key")
def _(shared: Shared, tmp: Path):
    outcome, names = _train_config(tmp, GOOD + "    c.optim.learnig_rate = 3e-4\n    return c\n")
    return outcome, [*names, "optim.learnig_rate"]


@case("config file (viper train)", "wrong type for a key (a string learning rate)")
def _(shared: Shared, tmp: Path):
    outcome, names = _train_config(tmp, GOOD + "    c.optim.learning_rate = 'fast'\n    return c\n")
    return outcome, [*names, "learning_rate"]


@case("config override (viper train)", "--config.optim.learning_rate=fast")
def _(shared: Shared, tmp: Path):
    outcome, _ = _train_config(tmp, GOOD + "    return c\n", "--config.optim.learning_rate=fast")
    return outcome, ["optim.learning_rate"]


@case("config file (viper train)", "missing file")
def _(shared: Shared, tmp: Path):
    from viper_jax.cli import main

    return cli("viper", main, ["train", "--config", str(tmp / "nope.py")]), [str(tmp / "nope.py")]


def _synth_config(tmp: Path, body: str) -> tuple[Outcome, list[str]]:
    from synthesis_torch.cli import main

    path = tmp / "synth_config.py"
    path.write_text(body)
    (tmp / "images").mkdir()
    return cli("viper-synth", main, ["caption-refine", "--images", str(tmp / "images"), "--out", str(tmp / "out"),
                                     "--config", str(path)]), [str(path)]


SYNTH_GOOD = "from synthesis_torch.config import default_config\n\ndef get_config():\n    c = default_config()\n"


@case("config file (viper-synth)", "Python syntax error")
def _(shared: Shared, tmp: Path):
    return _synth_config(tmp, SYNTH_GOOD + "    c.inputs.min_side = (\n    return c\n")


@case("config file (viper-synth)", "Python syntax error, through the console (`python -m synthesis_torch`)")
def _(shared: Shared, tmp: Path):
    path = tmp / "synth_config.py"
    path.write_text(SYNTH_GOOD + "    c.inputs.min_side = (\n    return c\n")
    (tmp / "images").mkdir()
    argv = ["caption-refine", "--images", str(tmp / "images"), "--out", str(tmp / "out"), "--config", str(path)]
    return console("synthesis_torch", argv, tmp), [str(path)]


@case("config file (viper-synth)", "unknown key")
def _(shared: Shared, tmp: Path):
    outcome, names = _synth_config(tmp, SYNTH_GOOD + "    c.inputs.min_sid = 3\n    return c\n")
    return outcome, [*names, "inputs.min_sid"]


@case("config file (viper-synth)", "wrong type for a key (a string min_side)")
def _(shared: Shared, tmp: Path):
    outcome, names = _synth_config(tmp, SYNTH_GOOD + "    c.inputs.min_side = 'big'\n    return c\n")
    return outcome, [*names, "min_side"]
