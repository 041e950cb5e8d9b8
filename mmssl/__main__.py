"""`python -m mmssl COMMAND ...`: the `mmssl` command, for an environment whose scripts are
not on PATH (`python -m mmssl demo`, `python -m mmssl eval zeroshot ...`)."""

import sys

from mmssl.cli import main

sys.exit(main())
