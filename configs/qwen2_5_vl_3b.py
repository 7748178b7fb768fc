"""ViPER on Qwen2.5-VL-3B-Instruct: the 7B config's settings (the paper uses the same for both sizes),
per-sample loss normalisation and the BGE-M3 reward embeddings (tau 0.85) included.

    viper train --config configs/qwen2_5_vl_3b.py --workdir /ckpt/viper3b \
        --config.model.path=/models/Qwen2.5-VL-3B-Instruct --config.reward.embedding_model=/models/bge-m3
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_viper_7b_config", Path(__file__).with_name("qwen2_5_vl_7b.py"))
_seven = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_seven)


def get_config():
    c = _seven.get_config(model_path="/models/Qwen2.5-VL-3B-Instruct")
    c.rl.micro_batch_prompts = 8  # 3.8B parameters: twice the rows per forward/backward
    return c
