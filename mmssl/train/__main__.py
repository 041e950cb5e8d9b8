"""`python -m mmssl.train RECIPE.yaml [key=value ...]` (and under torchrun / deepspeed)."""

import sys

from mmssl import distributed
from mmssl.train.cli import main

code = main()
distributed.destroy()
sys.exit(code)
