"""`python -m mmssl.train RECIPE.yaml [key=value ...]` (and under torchrun / deepspeed)."""

import sys

from mmssl import distributed
from mmssl.cliargs import tolerant_streams
from mmssl.train.cli import main

tolerant_streams()
code = main()
distributed.destroy()
sys.exit(code)
