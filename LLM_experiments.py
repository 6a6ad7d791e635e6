"""KL between two causal language models. Run `python LLM_experiments.py --help`."""
import sys

from kl_estimation.cli import llm_main

if __name__ == "__main__":
    # Defaults a user edits here; every one is also a flag. Without --p-model/--q-model the offline default pair is
    # built once (about 1.5 minutes on 2 cores) and reused.
    n_reps = 1000
    t_length = 20
    temperature = 0.4
    output_folder = "tests2/"
    prompt = "An interesting fact is that"
    sys.exit(llm_main(n_reps=n_reps, t_length=t_length, temperature=temperature, output_folder=output_folder,
                      prompt=prompt))
