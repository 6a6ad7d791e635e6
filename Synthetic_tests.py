"""Synthetic KL experiments on long-tailed token distributions. Run `python Synthetic_tests.py --help`."""
import sys

try:  # Ctrl-C while the package loads (seconds, on a busy machine) ends as any other: one line, status 130
    from kl_estimation.cli import synthetic_main
except KeyboardInterrupt:
    print("Synthetic_tests.py: interrupted: nothing was written; run the same command again", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    # Defaults a user edits here; every one is also a flag.
    vocab_size = 3000
    n_samples = 300
    n_repeats = 2
    divergence = "medium"  # 'low', 'medium', 'high' or 'all'
    alpha_values = [0.3, 0.5, 0.7, 0.9]
    families = ["zipf", "zipf-cutoff", "mixture"]
    rb_top_k = 100  # Rao-Blackwell: top-k tokens of P summed exactly (0 = naive MC)
    seed = 0
    sys.exit(synthetic_main(vocab_size=vocab_size, n_samples=n_samples, n_repeats=n_repeats, divergence=divergence,
                            alpha_values=alpha_values, families=families, rb_top_k=rb_top_k, seed=seed))
