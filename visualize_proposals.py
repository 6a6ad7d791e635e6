"""Draw every figure of a synthetic run folder from its saved files. Run `python visualize_proposals.py --help`."""
import sys

try:  # Ctrl-C while the package loads (seconds, on a busy machine) ends as any other: one line, status 130
    from kl_estimation.cli import visualize_main
except KeyboardInterrupt:
    print("visualize_proposals.py: interrupted: no figure was drawn; run the same command again", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    fmt = "png"  # 'png', 'pdf' or 'svg'
    sys.exit(visualize_main(format=fmt))
