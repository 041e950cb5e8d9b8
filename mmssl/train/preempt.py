"""A run asked to stop by SIGTERM saves a checkpoint and exits, rather than losing the steps
since its last one.

SIGTERM is what a cluster scheduler sends before it kills a job it preempts or that ran out
of time (SLURM signals every process of the job, then SIGKILLs them after its grace period;
torchrun passes the signal on to its ranks).  While a run trains, `SigtermStop` holds the
signal's handler, which only records it.  Every `checkpoint.sigterm_check_every` steps the
loop asks `agreed()`: a sum over the ranks of one number, so that ranks that have not seen
the signal yet stop at the same step as the one that has.  The run then saves that step's
checkpoint (unless it just did), writes its summary and exits with code 143 (128 + SIGTERM,
what a process killed by it reports); `checkpoint.resume=auto` continues it exactly.  The
check is a host sync, as a logging step is; 0 turns the handler off, and SIGTERM then kills
the run at once, as Ctrl-C (SIGINT) always does.

Data-loader workers ignore SIGTERM (`mmssl.data.producer.ignore_sigterm`): the scheduler
signals them too, and a worker gone would fail the step before the save; their parent stops
them.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch

EXIT_CODE = 128 + signal.SIGTERM  # 143

_received = threading.Event()  # set by the handler; process-wide, as signal handlers are


def requested() -> bool:
    """Whether this process has received SIGTERM while a `SigtermStop` was held."""
    return _received.is_set()


def _record(signum: int, frame: FrameType | None) -> None:
    _received.set()


class SigtermStop:
    """Hold the SIGTERM handler for a training loop (a no-op when `every` is 0, or off the
    main thread, where Python cannot set handlers); `agreed(step, dev)` every `every` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._old: Any = None
        self._held = False

    def __enter__(self) -> SigtermStop:
        _received.clear()
        if self.every > 0 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, _record)
            self._held = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._held:  # None: the old handler was a C one, which Python cannot restore
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._old is None else self._old)
            self._held = False
        _received.clear()

    def agreed(self, step: int, dev: torch.device) -> bool:
        """Whether any rank has received SIGTERM, on every rank alike: asked (a collective)
        at the steps that are multiples of `every` only, so that all ranks ask together."""
        if self.every <= 0 or step % self.every:
            return False
        from mmssl import distributed

        flag = torch.tensor([1.0 if requested() else 0.0], device=dev)
        return bool(distributed.all_reduce_sum(flag).item() > 0)
