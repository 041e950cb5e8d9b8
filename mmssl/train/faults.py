"""Fault injection for the reliability tests (tests/faults), off unless `MMSSL_FAULTS` is set.

`MMSSL_FAULTS` is a comma-separated list of `WHAT@STEP` items, read when `train` starts
(never at import).  STEP is the 1-based number of the optimizer step (the step that writes
checkpoint `step_STEP`), or a range `A-B`:

- `nan_loss@S`, `inf_loss@S`: the loss of step S becomes NaN / inf (its gradient stays finite);
- `nan_grad@S`, `inf_grad@S`: the loss stays finite, its gradient becomes NaN / inf;
  a suffix `:rR` limits a loss or gradient fault to rank R (e.g. `nan_loss@5:r1`);
- `pause@POINT:S`: at POINT of step S the process writes its pid to
  `RUN_DIR/.faults/POINT.rank<R>` and sleeps until it is killed (the kill-and-resume tests
  send SIGKILL there) or receives SIGTERM (the run then goes on, to save and stop there).
  POINT is `step_end` (step S done, its checkpoint included, the next step not started),
  `mid_step` (forward and backward of step S done, the optimizer update not applied) or
  `save` (checkpoint S written by DeepSpeed, its manifest not yet).

With the variable unset every hook is a no-op and the loss is passed through untouched.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

ENV = "MMSSL_FAULTS"
LOSS_KINDS = ("nan_loss", "inf_loss", "nan_grad", "inf_grad")
POINTS = ("step_end", "mid_step", "save")
PAUSE_LIMIT_S = 600.0  # a paused process that nobody kills exits on its own


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back is multiplied by `value` (NaN or inf)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, value: float
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.value = value  # type: ignore[attr-defined]
        return x.clone()

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.value, None  # type: ignore[attr-defined]


def _steps(text: str) -> range:
    first, _, last = text.partition("-")
    steps = range(int(first), int(last or first) + 1)
    if not steps:
        raise ValueError  # A-B with B < A
    return steps


class Faults:
    """The parsed `MMSSL_FAULTS` of this process; `Faults("")` injects nothing."""

    def __init__(self, spec: str, run_dir: Path | None = None, rank: int = 0) -> None:
        self.run_dir, self.rank = run_dir, rank
        self.loss: dict[int, str] = {}
        self.pauses: set[tuple[str, int]] = set()
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            what, sep, where = item.partition("@")
            try:
                if what in LOSS_KINDS and sep:
                    steps, limited, only = where.partition(":r")
                    if limited and not (only.isascii() and only.isdigit()):
                        raise ValueError  # `:r` with no rank: not "every rank"
                    chosen = _steps(steps)  # read on every rank: a bad spec fails on all
                    if not limited or int(only) == rank:
                        self.loss.update(dict.fromkeys(chosen, what))
                elif what == "pause" and where.partition(":")[0] in POINTS:
                    point, _, steps = where.partition(":")
                    self.pauses.update((point, s) for s in _steps(steps))
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{ENV}: cannot read {item!r}; expected nan_loss@S, inf_loss@S, nan_grad@S "
                    f"or inf_grad@S (S a step or A-B, optionally :rR with R a rank number), or "
                    f"pause@POINT:S with POINT in {POINTS}"
                ) from None

    @classmethod
    def from_env(cls, run_dir: Path, rank: int) -> Faults:
        """The faults that MMSSL_FAULTS asks for (none when it is unset)."""
        return cls(os.environ.get(ENV, ""), run_dir, rank)

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of `step`, with the fault of that step (if any) applied."""
        kind = self.loss.get(step)
        if kind is None:
            return loss
        value = float("nan") if kind.startswith("nan") else float("inf")
        if kind.endswith("_loss"):
            return loss + value
        return _PoisonGrad.apply(loss, value)

    def pause(self, point: str, step: int) -> None:
        """Announce this process and wait to be killed, if `point` of `step` is a pause."""
        if (point, step) not in self.pauses or self.run_dir is None:
            return
        folder = self.run_dir / ".faults"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{point}.rank{self.rank}.tmp"
        tmp.write_text(str(os.getpid()), encoding="utf-8")
        tmp.replace(folder / f"{point}.rank{self.rank}")
        from mmssl.train.preempt import requested

        deadline = time.monotonic() + PAUSE_LIMIT_S
        while time.monotonic() < deadline:
            if requested():  # SIGTERM, held by the run: it goes on to save and stop
                return
            time.sleep(0.05)
        os._exit(86)  # nobody came: fail loudly rather than train on
