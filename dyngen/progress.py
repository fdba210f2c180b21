"""Progress of long work, on the host: rate and ETA of a loop of batches, and steps inside one compiled loop.

A loop on the host (sampling batches, evaluation batches, dataset shards, tensors converted):

  meter = progress.Meter("Sampling", total=len(labels), unit="images")
  for ...:
    ...
    meter.update(done)     # "Sampling: 500/1000 images, 11.2 images/s, ETA 45 s" at most every few seconds

Inside a jitted `lax.scan` (a sampling loop of hundreds of model calls is one XLA program, so the host hears
nothing until it ends): a `LoopProgress` passed to the loop makes the body call back to the host every
`total // reports` steps, with `jax.debug.callback` under a `lax.cond`. The loop stays one program (no
host round trip decides anything; the callback only reads a step count) and the samples are unchanged:

  loop_progress = progress.LoopProgress("Sampling batch")
  def body(carry, scanned):
    ...
    loop_progress.tick(done, total)          # done: traced step count after this step, 1..total
    return carry, out

Both print at most every `min_seconds`, so fast work stays quiet and long work reports regularly.
`StepMeter` makes the trainer's progress line (steps/s, images/s, ETA, loss).
"""
import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import logging


def format_seconds(seconds: float) -> str:
  """12 s, 3 min 05 s, 2 h 07 min: what a person reads at a glance."""
  seconds = max(0.0, float(seconds))
  if seconds < 60:
    return f"{seconds:.0f} s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes} min {secs:02d} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes:02d} min"


class Meter:
  """Rate and ETA of `total` units done in increments, logged at most every `min_seconds` (and at the end).

  `update(done)` takes the running count; the rate is measured from the first update's predecessor, i.e.
  from when the meter was made (`start()` restarts the clock, e.g. after a compile that should not count).
  """

  def __init__(self, label: str, total: int, unit: str = "items", *, min_seconds: float = 10.0,
               log_last: bool = True):
    self.label, self.total, self.unit = label, int(total), unit
    self.min_seconds, self.log_last = min_seconds, log_last
    self.start()

  def start(self, done: int = 0) -> None:
    self.start_time = self.last_log = time.perf_counter()
    self.start_done = done

  def rate(self, done: int) -> float:
    elapsed = time.perf_counter() - self.start_time
    return (done - self.start_done) / elapsed if elapsed > 0 else float("inf")

  def line(self, done: int) -> str:
    rate = self.rate(done)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    return (f"{self.label}: {done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s, "
            f"ETA {format_seconds(eta) if eta != float('inf') else '?'}")

  def update(self, done: int) -> bool:
    """Logs the line when `min_seconds` passed since the last one, or at the end; returns whether it did."""
    now = time.perf_counter()
    finished = done >= self.total
    if not (now - self.last_log >= self.min_seconds or (finished and self.log_last)):
      return False
    self.last_log = now
    if finished:
      logging.info("%s: %d %s in %s (%.3g %s/s)", self.label, done, self.unit,
                   format_seconds(now - self.start_time), self.rate(done), self.unit)
    else:
      logging.info("%s", self.line(done))
    return True


@dataclasses.dataclass(frozen=True, eq=False)
class LoopProgress:
  """Step progress from inside a compiled loop (see the module docstring).

  Hashable by identity, so that it can sit in a jitted function's closure or static arguments. The host
  side keeps its clock in the object: a new run of the loop is recognised by its first step (done == 1).

  Attributes:
    label: what the line names, e.g. "Sampling batch".
    reports: how many callbacks a run of the loop makes at most (one every `total // reports` steps).
    min_seconds: the least time between two printed lines; a loop shorter than that prints nothing.
  """
  label: str = "Loop"
  reports: int = 20
  min_seconds: float = 10.0
  _clock: dict = dataclasses.field(default_factory=dict, repr=False)

  def tick(self, done, total: int) -> None:
    """Traced: calls back to the host at step 1 (starts the clock) and every `total // reports` steps.

    Args:
      done: () int traced or concrete, the steps finished including this one (1..total).
      total: the loop's static length.
    """
    every = max(1, total // self.reports)
    done = jnp.asarray(done, jnp.int32)

    def report():
      jax.debug.callback(self._on_host, done, total)

    jax.lax.cond((done == 1) | (done % every == 0), report, lambda: None)

  def _on_host(self, done, total) -> None:
    done, total = int(done), int(total)
    now = time.perf_counter()
    if done == 1 or "start" not in self._clock:
      self._clock.update(start=now, last=now, first_done=done)
      return
    if now - self._clock["last"] < self.min_seconds:
      return
    self._clock["last"] = now
    rate = (done - self._clock["first_done"]) / (now - self._clock["start"])
    logging.info("%s: step %d/%d, %.3g steps/s, ETA %s", self.label, done, total, rate,
                 format_seconds((total - done) / rate) if rate > 0 else "?")


class StepMeter:
  """The training loop's progress line: steps/s, images/s and the ETA of the remaining steps, measured between
  two lines, with the time spent in `paused()` sections (sample grids, evaluations) left out of the rate."""

  def __init__(self, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.start(0)

  def start(self, step: int) -> None:
    self.last_time, self.last_step, self.paused_seconds = time.perf_counter(), step, 0.0
    self.images_per_second = 0.0  # of the latest `line`

  @contextlib.contextmanager
  def paused(self):
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.paused_seconds += time.perf_counter() - begin

  def line(self, step: int, loss: float, extra: str = "") -> str:
    """'Step 300/3000 (10%): loss 0.0712, 12.1 steps/s, 774 images/s, ETA 3 min 43 s'; restarts the interval."""
    now = time.perf_counter()
    elapsed = max(now - self.last_time - self.paused_seconds, 1e-9)
    rate = (step - self.last_step) / elapsed
    self.last_time, self.last_step, self.paused_seconds = now, step, 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    self.images_per_second = rate * self.batch_size
    return (f"Step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%): loss {loss:.4f}{extra}, "
            f"{rate:.3g} steps/s, {rate * self.batch_size:.4g} images/s, "
            f"ETA {format_seconds(eta) if eta != float('inf') else '?'}")
