import sys

from hqlabel.jobs.cli import main

sys.exit(main())
