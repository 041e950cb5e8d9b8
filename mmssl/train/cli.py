"""`mmssl train RECIPE.yaml [key=value ...]`, also `python -m mmssl.train`, `torchrun -m
mmssl.train` and `deepspeed --module mmssl.train`: one entry point for every launcher.

Bad input (unknown or mistyped recipe keys, batch arithmetic, missing shards, a DeepSpeed
JSON that contradicts the recipe) is one line on stderr and exit code 2, before anything
is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

from mmssl.cliargs import ArgumentParser, check_numbers, summary
from mmssl.schema import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mmssl train", description=summary(__doc__))
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    # default=[]: without it argparse counts a `*` positional as required and names it in
    # "the following arguments are required: recipe, overrides"
    p.add_argument(
        "overrides", nargs="*", default=[], help="dotted overrides, e.g. train.steps=100"
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="check the recipe (and print it resolved), do not train",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --validate: the number of ranks to check the batch sizes for",
    )
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment rules
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _error(message: str, code: int = 2) -> int:
    rank = os.environ.get("RANK")  # unset under `--validate` with a WORLD_SIZE of its own
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank is not None
    prefix = f"[rank {rank}] " if multi else ""
    print(f"mmssl train: error: {prefix}{message}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _stdout_aside() -> Iterator[io.StringIO]:
    """What would reach stdout meanwhile, into a buffer: prints, and DeepSpeed's logger, whose
    handler writes to the `sys.stdout` of its import (its "Setting accelerator to CPU"
    warning would otherwise open the resolved recipe that `--validate` prints, making it
    invalid YAML).  The logger's handlers are pointed back at the real stdout afterwards."""
    real, buf = sys.stdout, io.StringIO()
    handlers = logging.getLogger("DeepSpeed").handlers
    for h in handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is real:
            h.setStream(buf)
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        # the handlers of a DeepSpeed imported meanwhile were made with `buf` as sys.stdout
        for h in logging.getLogger("DeepSpeed").handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is buf:
                h.setStream(real)


def main(argv: list[str] | None = None) -> int:
    """`mmssl train RECIPE [key=value ...]`: exit code 0; 2 on bad input; 1 when training stops on
    non-finite values; 143 when SIGTERM stopped it after a checkpoint (`mmssl.train.preempt`)."""
    args = _parser().parse_intermixed_args(argv)  # overrides before or after options
    problem = check_numbers(
        args,
        {"world_size": (lambda v: v >= 1, ">= 1"), "local_rank": (lambda v: v >= 0, ">= 0")},
    )
    if problem:
        return _error(problem)
    if args.world_size is not None and not args.validate:  # a run has the launcher's ranks
        return _error("--world-size only applies with --validate")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from mmssl.data.errors import DataError
    from mmssl.train.recipe import dump_recipe, load_recipe, validate

    # with --validate, stdout is the resolved recipe alone: what else was printed meanwhile
    # goes to stderr (to stdout as before when the recipe is refused, so that stderr keeps
    # its one line)
    aside = _stdout_aside() if args.validate else contextlib.nullcontext(None)
    with aside as noise:
        try:
            recipe = load_recipe(args.recipe, args.overrides)
            resolved = validate(recipe, args.world_size)
        except (ConfigError, DataError, OSError) as err:  # OSError: a path too long, ...
            problem = str(err)
        else:
            problem = None
    if noise is not None:
        print(noise.getvalue(), end="", file=sys.stdout if problem else sys.stderr)
    if problem is not None:
        return _error(problem)
    if args.validate:
        print(dump_recipe(recipe), end="")
        print(
            f"# ok: {resolved.world_size} ranks x micro-batch {recipe.train.micro_batch_size}"
            f" x {resolved.grad_accum} accumulation steps = {recipe.train.global_batch_size}"
        )
        return 0
    from mmssl.train.loop import train
    from mmssl.train.nonfinite import NonFiniteError

    try:
        out = train(recipe, resolved)
    except (ConfigError, DataError, FileNotFoundError) as err:
        return _error(str(err))
    except NonFiniteError as err:  # the run failed, the input was fine: not a usage error
        return _error(str(err), 1)
    if out.get("preempted"):
        from mmssl.train.preempt import EXIT_CODE

        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mmssl train: {recipe.name}: {out['stopped']}; {out['what next']}")
        return EXIT_CODE  # what a job killed by SIGTERM reports: a scheduler requeues it
    if int(os.environ.get("RANK", "0")) == 0 and out.get("complete"):
        # a finished run run again: its summary.md is left as the training wrote it
        stop = recipe.train.stop_at
        until = " (train.stop_at)" if stop and stop < recipe.train.steps else ""
        print(
            f"mmssl train: {recipe.name}: already complete at step {out['final_step']} of "
            f"{recipe.train.steps}{until}, nothing to do; run directory {recipe.run_dir}"
        )
    elif int(os.environ.get("RANK", "0")) == 0:
        print(
            f"mmssl train: {recipe.name}: steps {out['steps']}, "
            f"{out['samples_per_s']:.1f} samples/s, run directory {recipe.run_dir}"
        )
    return 0
