"""What the rollout side and the learner share: the model factory, the prompt, the special tokens and the
weight push between them."""
