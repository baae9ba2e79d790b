"""Graceful stop: finish the optimizer step, save a checkpoint, exit with EXIT_CODE, resume later.

A stop is asked for by
- SIGUSR1 to any rank (`#SBATCH --signal=USR1@120` ahead of the time limit, `scancel --signal=USR1 JOB`,
  preemption with SlurmctldParameters=preempt_send_user_signal),
- the stop file `./launch.sh` creates on the first Ctrl-C (PIPELINE_STOP_FILE, looked at by rank 0).
SIGTERM is not a stop: at a time limit, `scancel` or a preemption SLURM sends it to the ranks and to
srun, which answers it by killing its tasks (SIGKILL); DeepSpeed's launcher tears a failed job down
with it. It ends a rank at once, and resume starts from the last complete checkpoint.
Each rank's request travels in the all-reduce the training loop does at every accumulation
boundary anyway, so all ranks stop after the same optimizer step. A second signal ends the process
at once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from . import dist

EXIT_CODE = 75  # EX_TEMPFAIL, "try again": a requeued job resumes from the checkpoint just saved
STOP_FILE = "PIPELINE_STOP_FILE"


class Stopped(Exception):
    """Training stopped on request: after saving a complete checkpoint, or before the first step with
    nothing to save (the message says which)."""

    @classmethod
    def before_training(cls, stage: str) -> Stopped:
        return cls(f"stopped on request during {stage}, before the first optimizer step: nothing to save; rerun to start again")


# This process's stop request (signal handlers are per process): long one-off work that has no
# collective to vote in, rank 0's tokenizing, asks it between batches (`raise_if_requested`).
_requests = None


class StopRequests:
    """This rank's stop request: set by a signal, or by rank 0 finding the launcher's stop file."""

    def __init__(self):
        global _requests
        self.requested = False
        self.file = os.environ.get(STOP_FILE)
        signal.signal(signal.SIGUSR1, self._handle)
        _requests = self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop now, as the signal would have without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        print(
            f"[rank {dist.rank()}] {signal.Signals(signum).name}: stopping after this optimizer step with a checkpoint "
            "(before the first step: at once, with nothing to save)",
            flush=True,
        )

    def pending(self) -> float:
        """1.0 when this rank has been asked to stop, else 0.0 (summed over ranks at each boundary)."""
        if not self.requested and self.file and dist.is_main() and os.path.exists(self.file):
            self.requested = True
        return float(self.requested)


def raise_if_requested(stage: str) -> None:
    """End `stage` at once when this process was asked to stop before the first step: there is no
    checkpoint to make, and what the stage half built is discarded (its caches are built aside)."""
    if _requests is not None and _requests.pending():
        raise Stopped.before_training(stage)


# Test hook (documented in docs/troubleshooting.md): "STAGE:PATH" makes rank 0, the first time it
# reaches STAGE (data, tokenize: after the first batch of records is tokenized, evaluate, save,
# saved: a save's files all written but not its manifest, saved-step-N: the same in step N's save,
# step-N: before step N's stop vote), write its pid to PATH and wait until PATH is removed, so a
# test can send a signal at that stage. Several hooks are separated by commas, each used once.
PAUSE_AT = "PIPELINE_TEST_PAUSE_AT"


def pause_for_test(*stages: str) -> None:
    """Pause here if a hook names one of `stages` (a point can have a plain and a step's name)."""
    if not dist.is_main():
        return
    hooks = [hook for hook in os.environ.get(PAUSE_AT, "").split(",") if hook]
    for hook in hooks:
        wanted, _, marker = hook.partition(":")
        if wanted in stages:
            os.environ[PAUSE_AT] = ",".join(h for h in hooks if h != hook)  # once
            Path(marker).write_text(str(os.getpid()), encoding="utf-8")
            while os.path.exists(marker):
                time.sleep(0.1)
            return


def exit_as_stopped() -> None:
    """After the checkpoint is complete every rank exits with EXIT_CODE, even if a signal comes first
    (a launcher tearing the job down once the first rank has exited non-zero)."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, lambda *_: os._exit(EXIT_CODE))
