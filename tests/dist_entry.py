"""LLM_experiments.py for tests run under torchrun: with KL_TEST_DIE_AFTER=k, rank r is killed (KeyboardInterrupt)
at its (k + r)-th forward batch, leaving its finished batches in its partial file. The dying rank first waits until
every rank has kept a batch: torchrun stops the other ranks when one dies, and on a busy machine a slower rank would
otherwise be stopped before it kept anything."""
import os
import sys
import time
from pathlib import Path

from kl_estimation.cli import llm_main
from kl_estimation.llm.run import units


def every_rank_kept_a_batch(out: Path, world: int) -> bool:
    files = [next(out.glob(f"*.rank{r}.partial.jsonl"), None) for r in range(world)]
    return all(f is not None and len(f.read_text().splitlines()) >= 2 for f in files)  # a header, then batches


if __name__ == "__main__":
    die = int(os.environ.get("KL_TEST_DIE_AFTER", "0"))
    if die:
        real, calls = units.sample_batch, [0]
        out = Path(sys.argv[sys.argv.index("--output-dir") + 1])

        def dying(*a, **k):
            calls[0] += 1
            if calls[0] == die + int(os.environ["RANK"]):
                deadline = time.monotonic() + 120
                while not every_rank_kept_a_batch(out, int(os.environ["WORLD_SIZE"])) and time.monotonic() < deadline:
                    time.sleep(0.1)
                raise KeyboardInterrupt
            return real(*a, **k)

        units.sample_batch = dying
    sys.exit(llm_main(sys.argv[1:]))
