"""Preemption and numerical faults: what the training loop does when things go wrong.

- SIGTERM (TPU maintenance, a spot VM reclaimed, a scheduler stopping the job): the loop
  saves a checkpoint at the next step boundary, waits for it and raises `Preempted`;
  `python -m imagen_jax.train` then exits with EXIT_PREEMPTED, and the same command
  resumes.
- A NaN or Inf in the loss or the gradients: the train step drops that update (see
  train/step.py); `NonfiniteGuard` stops the run after K such steps in a row.

Several hosts: a SIGTERM may reach one host, or all of them at different moments, and
hosts that stopped at different steps would wait on each other's collectives forever. So
the hosts decide together (`PreemptionCheck`, `sigterm_anywhere`): all stop at the same
step boundary, the first one after the signal reached any of them has been shared (one
step later than on one host), and save that step's checkpoint together.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import jax
from absl import logging

from imagen_jax.parallel import distributed

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": the run saved
# its state and stopped because it was asked to, not because it failed or finished.
EXIT_PREEMPTED = 75

_sigterm = threading.Event()
_depth = 0  # nesting of handle_sigterm()


class Preempted(Exception):
  """A SIGTERM stopped `stage` at `step` (None: before it started); `saved_step` is its
  latest complete checkpoint, `step` itself unless that save failed."""

  def __init__(self, stage: str, step: int | None = None, saved_step: int | None = None):
    self.stage, self.step, self.saved_step = stage, step, saved_step
    if step is None:
      where = "before it started"
    elif saved_step == step:
      where = f"at step {step}, its checkpoint saved"
    else:
      where = (f"at step {step}, whose checkpoint did not complete; the latest complete one "
               f"is step {saved_step}")
    super().__init__(f"SIGTERM received: stage {stage} stopped {where}. Run the same command "
                     "again to resume.")


class NonfiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


@contextlib.contextmanager
def handle_sigterm():
  """While active, a SIGTERM sets a flag (`sigterm_received`) instead of ending the process.

  The flag is process-wide, so a SIGTERM that arrives between two stages still stops the
  next one; it is cleared when the outermost `handle_sigterm` is entered.
  """
  global _depth
  if threading.current_thread() is not threading.main_thread():
    logging.warning("Training outside the main thread: SIGTERM is not handled.")
    yield
    return
  if _depth == 0:
    _sigterm.clear()
  # The handler only sets an Event: logging from a handler can deadlock on the log lock.
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: _sigterm.set())
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    signal.signal(signal.SIGTERM, previous)


def sigterm_received() -> bool:
  """Whether this process received SIGTERM (see `sigterm_anywhere` on several hosts)."""
  return _sigterm.is_set()


def sigterm_anywhere() -> bool:
  """Whether any host received SIGTERM; the same answer on every host. Blocking, and every
  host must call it at the same point (between stages, say)."""
  return distributed.any_host(sigterm_received())


class PreemptionCheck:
  """`check()` at every step boundary: True when the run must stop there, on every host at
  the same step. One host: at the first boundary after its SIGTERM. Several: one boundary
  later, without a blocking round trip per step (distributed.AgreedFlag)."""

  def __init__(self):
    self._agreed = distributed.AgreedFlag()

  def check(self) -> bool:
    return self._agreed.poll(sigterm_received())


class NonfiniteGuard:
  """Counts consecutive steps whose update was skipped, and stops after `limit` of them.

  Reading a step's flag right after dispatching it would stall the device queue, so each
  step's flag is read once the next step is queued (`push`), and the last at `finish`.
  """

  def __init__(self, stage: str, limit: int):
    self.stage, self.limit = stage, limit
    self.consecutive = 0
    self._pending = None  # (step, metrics) of the newest step, not yet checked

  def push(self, step: int, metrics: dict) -> None:
    previous = self._pending
    self._pending = (step, {k: metrics[k] for k in ("nonfinite", "loss", "grad_norm",
                                                      "skipped_steps")})
    if previous is not None:
      self._check(*previous)

  def finish(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._check(*pending)

  def _check(self, step: int, metrics: dict) -> None:
    m = jax.device_get(metrics)
    if not m["nonfinite"]:
      self.consecutive = 0
      return
    self.consecutive += 1
    logging.warning("[%s] step %d: loss %s, gradient norm %s; update skipped (%d in a row, %d "
                    "skipped in this stage).", self.stage, step, m["loss"], m["grad_norm"],
                    self.consecutive, m["skipped_steps"])
    if self.consecutive >= self.limit:
      raise NonfiniteError(self._diagnostic(step, m))

  def _diagnostic(self, step: int, m: dict) -> str:
    field = f"config.stages.{self.stage}"
    first = step - self.consecutive + 1
    return (
        f"Stage {self.stage}: steps {first}..{step} all had a non-finite loss or gradient "
        f"(last: loss {m['loss']}, gradient norm {m['grad_norm']}); stopping after "
        f"{field}.train.max_consecutive_nonfinite={self.limit} in a row. Those updates were "
        f"skipped, so the train state is that of step {first - 1}. Likely causes: a learning "
        f"rate too high ({field}.optimizer.learning_rate, warmup_steps), bfloat16 overflow "
        f"({field}.dtype=float32), or bad input. The data stream is deterministic, so "
        f"resuming replays these batches; {field}.train.log_example_keys=True writes the "
        "keys of each step's examples.")
