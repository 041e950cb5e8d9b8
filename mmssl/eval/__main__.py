"""`python -m mmssl.eval TASK ...`."""

import sys

from mmssl.eval.cli import main

sys.exit(main())
