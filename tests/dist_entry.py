"""LLM_experiments.py for tests run under torchrun: with KL_TEST_DIE_AFTER=k, rank r is killed (KeyboardInterrupt)
at its (k + r)-th forward batch, leaving its finished batches in its partial file."""
import os
import sys

from kl_estimation.cli import llm_main
from kl_estimation.llm.run import units

if __name__ == "__main__":
    die = int(os.environ.get("KL_TEST_DIE_AFTER", "0"))
    if die:
        real, calls = units.sample_batch, [0]

        def dying(*a, **k):
            calls[0] += 1
            if calls[0] == die + int(os.environ["RANK"]):
                raise KeyboardInterrupt
            return real(*a, **k)

        units.sample_batch = dying
    sys.exit(llm_main(sys.argv[1:]))
