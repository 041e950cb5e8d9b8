"""`python -m mmssl.eval TASK ...`."""

import sys

from mmssl.cliargs import tolerant_streams
from mmssl.eval.cli import main

tolerant_streams()
sys.exit(main())
