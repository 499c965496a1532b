import signal
import sys

try:
    from hqlabel.jobs.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line is imported: as main() says it, no traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("hqlabel: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
