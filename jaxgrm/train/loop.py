"""What every long training loop shares: preemption by SIGTERM and the save schedule."""

from __future__ import annotations

import signal


class Preemption:
    """Within `with Preemption() as p:`, SIGTERM sets `p.requested` instead of killing the process.
    The loop finishes its step, saves (`should_save` is then true) and calls `exit_if_requested`,
    which ends the process with status 143 so later stages of a pipeline do not start."""

    def __init__(self):
        self.requested = False

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_save(self, step: int, total: int, every: int) -> bool:
        """Save after `step` (1-based): on request, at the end, and every `every` steps."""
        return self.requested or step == total or bool(every and step % every == 0)

    def exit_if_requested(self, checkpointer) -> None:
        if self.requested:
            checkpointer.close()  # waits for the save of the last step
            raise SystemExit(128 + signal.SIGTERM)
