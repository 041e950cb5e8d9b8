"""`python -m mmssl.train RECIPE.yaml [key=value ...]` (and under torchrun / deepspeed)."""

import sys

from mmssl.train.cli import main

sys.exit(main())
