"""`viper loop`: ViPER's self-evolution rounds, each step a separate process (docs/loop_and_demo.md).

Round r (directory WORK/round_00r/, with status.json and logs/):
    synth_caption_refine  viper-synth caption-refine --images IMAGES --out synth/  (synthesiser VLM_r)
    synth_visual_ops      viper-synth visual-ops --records synth/ --out synth/      (VLM_r)
    train                 viper train --config TRAIN --workdir train/  (from VLM_r; stage 1, then stage 2)
    export                viper convert orbax-to-hf --ckpt train/checkpoints --out export/
VLM_0 is `models.vlm` (or the tiny VLM of `viper-synth tiny-models` when `models.tiny`); VLM_{r+1} is round
r's export, so the trained policy synthesises the next round's data and goes on training in it.

Resume: steps marked "done" in status.json are skipped; any other step reruns, and each is resumable by
itself (synthesis skips committed chunks, training restores its latest checkpoint, the export is renamed
into place), so rerunning an interrupted loop picks up where it stopped. `synth.mode = "wait"`
(`--wait_for_shards`): a separate GPU job runs synthesis; the loop writes its commands to
synth/REQUEST.json and polls until each job shard's manifest.json says `complete: true`.

Modules: config.py (schema, config files), rounds.py (`Loop`: the steps of a round), status.py (status.json,
synthesis shard manifests), processes.py (subprocesses into logs), cli.py (`viper loop`), demo.py (`viper demo`:
one round on CPU with tiny models, and its report).
"""

from viper_jax.loop.config import base_config, load_config  # noqa: F401  (config files import base_config)
from viper_jax.loop.rounds import Loop  # noqa: F401
from viper_jax.loop.status import STEPS, StepFailed  # noqa: F401
