"""KL between two causal language models. Run `python LLM_experiments.py --help`."""
import signal
import sys

# Ctrl-C while the package loads (seconds, on a busy machine) ends as any other: one line, status 130. It is held
# until the imports end: Python drops one that lands in a finalizer, and importing runs many.
hold = getattr(signal, "pthread_sigmask", lambda how, signals: None)  # not on Windows
hold(signal.SIG_BLOCK, {signal.SIGINT})
try:
    from kl_estimation.cli import llm_main
    from kl_estimation.llm.run.config import LLMConfig
    hold(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C held back is raised here
except KeyboardInterrupt:
    print("LLM_experiments.py: interrupted: nothing was written; run the same command again", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    # The defaults are LLMConfig's (kl_estimation/llm/run/config.py), read here, not copied: edit a value to change
    # it for this script (e.g. n_samples = 2000); every one is also a flag, and the same setting of estimate_kl.
    # Without --p-model/--q-model the offline default pair is built once (about 1.5 minutes on 2 cores) and reused.
    d = LLMConfig()
    n_samples = d.n_samples
    max_new_tokens = d.max_new_tokens
    temperature = d.temperature
    output_dir = d.output_dir  # None: a new folder under tests2/ for each run
    prompt = d.prompt
    sys.exit(llm_main(n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                      output_dir=output_dir, prompt=prompt))
