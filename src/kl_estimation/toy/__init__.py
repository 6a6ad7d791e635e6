"""Toy sequence models: Markov pairs with exact sequence KL and exact estimator variances by dynamic programming,
plugged into the LLM sampler itself (the --sequence experiment)."""
