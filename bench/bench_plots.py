"""Figures benchmark: time to draw every figure of the default synthetic run (target <= 10 s on 2 cores).

    python bench/bench_plots.py
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kl_estimation.cli import synthetic_main  # noqa: E402
from kl_estimation.figures import synthetic as plots  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as d:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            synthetic_main(["--no-plots", "--output-dir", d])
        n = None
        for workers in (1, None):
            t = time.perf_counter()
            index = plots.draw_all(d, workers=workers)
            dt = time.perf_counter() - t
            n = len(list(index.parent.glob("*.png")))
            label = "1 process" if workers == 1 else "all cores (default)"
            print(f"all {n} figures of the default run, {label}: {dt:.1f} s (target <= 10 s)")


if __name__ == "__main__":
    main()
