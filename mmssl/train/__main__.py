"""`python -m mmssl.train RECIPE.yaml [key=value ...]` (and under torchrun / deepspeed)."""

import sys

import torch.distributed as dist

from mmssl.train.cli import main

code = main()
# a launched rank tears its process group down itself, before the interpreter's own
# teardown (PyTorch asks for this; a rank that now and then aborted at exit with
# "terminate called without an active exception" did not, cause not diagnosed)
if dist.is_available() and dist.is_initialized():
    dist.destroy_process_group()
sys.exit(code)
