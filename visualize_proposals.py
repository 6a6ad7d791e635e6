"""Draw every figure of a synthetic run folder from its saved files. Run `python visualize_proposals.py --help`."""
import signal
import sys

# Ctrl-C while the package loads (seconds, on a busy machine) ends as any other: one line, status 130. It is held
# until the imports end: Python drops one that lands in a finalizer, and importing runs many.
hold = getattr(signal, "pthread_sigmask", lambda how, signals: None)  # not on Windows
hold(signal.SIG_BLOCK, {signal.SIGINT})
try:
    from kl_estimation.cli import visualize_main
    hold(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C held back is raised here
except KeyboardInterrupt:
    print("visualize_proposals.py: interrupted: no figure was drawn; run the same command again", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    fmt = "png"  # 'png', 'pdf' or 'svg'
    sys.exit(visualize_main(format=fmt))
