import sys

from fastrsb.cli import main

sys.exit(main())
