"""Synthetic KL experiments on long-tailed token distributions. Run `python Synthetic_tests.py --help`."""
import signal
import sys

# Ctrl-C while the package loads (seconds, on a busy machine) ends as any other: one line, status 130. It is held
# until the imports end: Python drops one that lands in a finalizer, and importing runs many.
hold = getattr(signal, "pthread_sigmask", lambda how, signals: None)  # not on Windows
hold(signal.SIG_BLOCK, {signal.SIGINT})
try:
    from kl_estimation.cli import synthetic_main
    from kl_estimation.synthetic.experiment import SyntheticConfig
    hold(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C held back is raised here
except KeyboardInterrupt:
    print("Synthetic_tests.py: interrupted: nothing was written; run the same command again", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    # The defaults are SyntheticConfig's (kl_estimation/synthetic/experiment.py), read here, not copied: edit a value
    # to change it for this script (e.g. vocab_size = 5000); every one is also a flag.
    d = SyntheticConfig()
    vocab_size = d.vocab_size
    n_samples = d.n_samples
    n_repeats = d.n_repeats
    divergence = d.divergence  # 'low', 'medium', 'high' or 'all'
    alpha_values = d.alpha_values
    families = d.families
    rb_top_k = d.rb_top_k  # Rao-Blackwell: top-k tokens of P summed exactly (0 = naive MC)
    seed = d.seed
    sys.exit(synthetic_main(vocab_size=vocab_size, n_samples=n_samples, n_repeats=n_repeats, divergence=divergence,
                            alpha_values=alpha_values, families=families, rb_top_k=rb_top_k, seed=seed))
