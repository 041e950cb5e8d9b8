"""What a non-finite training step does: it is skipped (no optimizer update, no LR-schedule
step) and counted, and `train.max_bad_steps` of them in a row stop the run (`NonFiniteError`).

A non-finite loss becomes a NaN gradient on the device (`finite_or_nan`), so one decision
covers both; DeepSpeed's ZeRO and bf16 optimizers check the gradients themselves, and the
plain fp32 stage-0 path is checked here (`grads_finite`, one host sync) and skipped the way
DeepSpeed skips (`skip_update`).  A skipped step leaves the weights as they were, so a
checkpoint falling due in a streak would hold no new weights and its rotation would delete
older checkpoints: none is saved until a step is applied again (`save_due`), except at the
run's end, which rotates none out (`rotation`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mmssl import distributed
from mmssl.train import checkpoint

_log = logging.getLogger("mmssl.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; `checkpoint` is the
    last good one (None: there is none)."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def finite_or_nan(loss: torch.Tensor) -> torch.Tensor:
    """`loss` itself when finite (x 1.0 is exact), else NaN with a NaN gradient everywhere, so
    that the optimizer's gradient check also catches a non-finite loss.  No host sync."""
    one = torch.ones((), dtype=loss.dtype, device=loss.device)
    return loss * torch.where(torch.isfinite(loss), one, torch.full_like(one, float("nan")))


def grads_finite(engine: Any) -> bool:
    """All (already all-reduced) gradients finite.  One host sync."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())


def skip_update(engine: Any) -> None:
    """Run DeepSpeed's step without the optimizer update and mark it as an overflow, so that
    DeepSpeed counts it skipped and holds the LR schedule, as its ZeRO/bf16 paths do."""
    opt = engine.optimizer
    opt.overflow = True
    opt.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        del opt.step, opt.overflow


def save_due(step: int, every: int, end: int, streak: int) -> bool:
    """Whether step `step` saves a checkpoint: every `every` steps unless in a streak of
    skipped steps (`streak` > 0), and at the run's `end` (train.steps or train.stop_at),
    which a resume starts from (`rotation` keeps the older ones then)."""
    if step == end:
        return True
    if not every or step % every:
        return False
    if streak and distributed.rank() == 0:
        _log.warning("step %d: no checkpoint saved in a run of skipped steps", step)
    return not streak


def rotation(keep_last: int, streak: int) -> int:
    """The `keep_last` of a save: a save in a streak (the run's end) deletes none, since the
    checkpoints before the streak are the ones with other weights."""
    return keep_last if not streak else 2**31


def stop(ckpt_dir: Path, step: int, streak: int) -> NonFiniteError:
    """The error that stops the run after `streak` skipped steps up to `step`, naming the last
    good checkpoint: the one resume=auto would take (a checkpoint with a manifest may still
    be damaged: truncated, bit-flipped).  Collective (the checkpoints are verified)."""
    good = checkpoint.newest_valid(ckpt_dir, "train.max_bad_steps")
    first = step - streak + 1
    where = "There is no good checkpoint."
    if good:
        where = f"The last good checkpoint is {ckpt_dir / good}"
        # complete ones only (a rotation cut short leaves folders without a manifest)
        older = [
            t
            for t in checkpoint.list_tags(ckpt_dir)
            if checkpoint.step_of(t) < first - 1 and (ckpt_dir / t / checkpoint.MANIFEST).is_file()
        ]
        # saved at step first - 1, or in the streak (a stop_at): the streak's weights
        if checkpoint.step_of(good) >= first - 1 and older:
            where += (
                f" (its weights are step {first - 1}'s, which every skipped step ran with; if "
                f"they are the cause, remove the checkpoints from step {first - 1} on to resume "
                f"from an earlier one: {', '.join(older)})"
            )
    return NonFiniteError(
        f"train.max_bad_steps: {streak} consecutive steps ({first}..{step}) had a non-finite "
        f"loss or gradient and were skipped; stopping. {where}",
        ckpt_dir / good if good else None,
    )
