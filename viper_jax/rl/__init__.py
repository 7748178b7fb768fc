"""RL pieces. Importing this package loads only the reward (no jax, no torch); the GRPO loss lives in
`viper_jax.rl.grpo_loss` (jax) and is imported from there."""

from viper_jax.rl.reward import (RewardOutput, SentenceTransformerEmbedder, ViperReward, available_rewards,
                                 get_reward, get_reward_config, register_reward, split_sentences)

__all__ = ["RewardOutput", "SentenceTransformerEmbedder", "ViperReward", "available_rewards", "get_reward",
           "get_reward_config", "register_reward", "split_sentences"]
