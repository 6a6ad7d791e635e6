"""What every CLI test checks of a bad input or an interrupt: the exit status and exactly one message line."""
import re

# progress.bar's lines in a log (LOG_FORMAT) and tqdm's own redraws: not messages
PROGRESS = re.compile(r": +\d+/\S+ .*\d+%|\d+%\|")


def call(main, argv, capsys):
    """Run a script's `main(argv)` in-process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, needle, status=2):
    """Exit `status`, one message line holding `needle` (progress lines aside), no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert code == status and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
