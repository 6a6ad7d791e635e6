"""Draw every figure of a synthetic run folder from its saved files. Run `python visualize_proposals.py --help`."""
import sys

from kl_estimation.cli import visualize_main

if __name__ == "__main__":
    fmt = "png"  # 'png', 'pdf' or 'svg'
    sys.exit(visualize_main(format=fmt))
