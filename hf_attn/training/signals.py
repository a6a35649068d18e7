"""Stop cleanly on SIGTERM / SIGINT: finish the optimizer step, write a checkpoint, exit.

Cluster schedulers announce preemption with SIGTERM (and SIGKILL after a grace period); Ctrl-C
sends SIGINT. Dying mid-step would lose everything since the last periodic checkpoint, so while
``StopSignals`` is active the handler only records the signal. The training loop sends the flag
through the all-reduce it already does every step, so that all processes stop after the same step
(a launcher may deliver the signal to the ranks at different moments, or to only some of them),
then writes a checkpoint and raises ``TrainingInterrupted``. A second signal of the same kind gets
its previous handler back: Ctrl-C twice stops at once (``KeyboardInterrupt``), without a checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """A stop signal ended the run at a step boundary after a checkpoint was written.

    Attributes: ``signal_name`` ("SIGTERM"...), ``step`` (the last optimizer step taken),
    ``checkpoint`` (the folder to resume from), ``exit_code`` (128 + signal number, the shell's
    convention for "ended by this signal"), ``num_processes`` and ``is_main_process`` (every
    process raises it; one of them should report it).
    """

    def __init__(
        self,
        message: str,
        *,
        signal_name: str,
        step: int,
        checkpoint: Path,
        exit_code: int,
        num_processes: int = 1,
        is_main_process: bool = True,
    ) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = exit_code
        self.num_processes = num_processes
        self.is_main_process = is_main_process


class StopSignals:
    """Context manager: SIGTERM and SIGINT set ``received`` instead of ending the process.

    Installs nothing outside the main thread (Python only delivers signals there).

    Args:
        announce: print one line to stderr when a signal arrives (the local main process).
    """

    def __init__(self, *, announce: bool) -> None:
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived on this process."""
        return self.received is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))  # a second one acts at once
        if self.announce:
            print(
                f"received {signal.Signals(signum).name}: stopping after this optimizer step and writing a "
                "checkpoint (send it again to stop at once, without a checkpoint)",
                file=sys.stderr,
                flush=True,
            )


__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingInterrupted"]
