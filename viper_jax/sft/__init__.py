"""`viper sft`: supervised fine-tuning of Qwen2.5-VL on the GRPO trainer's stack (trainer.py)."""
