"""KL between two causal language models. Run `python LLM_experiments.py --help`."""
import sys

try:  # Ctrl-C while the package loads (seconds, on a busy machine) ends as any other: one line, status 130
    from kl_estimation.cli import llm_main
except KeyboardInterrupt:
    print("LLM_experiments.py: interrupted: nothing was written; run the same command again", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    # Defaults a user edits here; every one is also a flag, and the same setting of estimate_kl (kl_estimation's API).
    # Without --p-model/--q-model the offline default pair is built once (about 1.5 minutes on 2 cores) and reused.
    n_samples = 1000
    max_new_tokens = 20
    temperature = 0.4
    output_dir = None  # None: a new folder under tests2/ for each run
    prompt = "An interesting fact is that"
    sys.exit(llm_main(n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature, output_dir=output_dir,
                      prompt=prompt))
