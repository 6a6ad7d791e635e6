"""Single-token synthetic experiments: long-tailed P/Q families where the exact KL and the exact variance of every
estimator are sums over the vocabulary."""
