"""Jobs that run beside the in-process tests: the subprocesses of the end-to-end tests.

An in-process test keeps about one of this machine's 2 cores busy (tracing and XLA
compilation are single-threaded; measured: 1.1 cores on average), while the end-to-end
tests (the train / sample command line, kill-and-resume, several hosts) spend minutes in
subprocesses of `python -m imagen_jax.train`. So those subprocesses run in one background
thread, one job after another, from the start of the session (tests/conftest.py starts
the jobs of the selected tests and runs those tests last). A test marked
`@pytest.mark.background.with_args(job)` (a bare `mark(function)` would mark the job
itself) calls `result(job)`: it waits for its job, then asserts on what the job returns
as it would on subprocesses it had run itself; an exception in the job is raised in the
test. Such a test's duration is its wait for the lane, not its cost: the lane's jobs
take about 5 minutes of the session (2 cores, warm compilation cache), most of it the
multi-host job. Its last job starts a helper pytest process that takes in-process test
files from the end of the queue (tests/work_stealing.py), so that both cores stay busy
to the end. The session's summary ends with a line saying when each job ran.
(Running the lane at a lower priority, `nice -n 10`, was measured and did not help: 11 min
58 s against 11 min 22 s cold, the lane then ending last. The two paths are about even,
and the 2 cores are busy throughout.)

A job gets a fresh directory and must not touch state shared with the in-process tests
(seqio's task registry, jax's global config): it runs subprocesses and reads files.
"""
from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time

_lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="background_tests")
_jobs: dict = {}                      # job function -> Future of its result
_processes: set = set()               # live subprocesses, killed if the session ends early
_lock = threading.Lock()
_stopping = False
_t0 = time.monotonic()
_times: dict = {}                     # job name -> (start, end) in seconds of the session


def start(job, directory) -> None:
  """Queues `job(directory)` in the lane (once per job)."""
  with _lock:
    if job not in _jobs:
      _jobs[job] = _lane.submit(_timed, job, directory)


def _timed(job, directory):
  start_s = time.monotonic() - _t0
  try:
    return job(directory)
  finally:
    _times[job.__name__] = (start_s, time.monotonic() - _t0)


def summary() -> str:
  """One line: when each job of the lane ran, in seconds since the session started ("" if
  none ran)."""
  if not _times:
    return ""
  return "background lane: " + ", ".join(
      f"{name} {a:.0f}-{b:.0f} s" for name, (a, b) in sorted(_times.items(), key=lambda x: x[1]))


def result(job, timeout: float = 1800):
  """Waits for `job` (started by conftest.py) and returns its result, or raises its error."""
  with _lock:
    future = _jobs.get(job)
  if future is None:
    raise RuntimeError(f"{job.__name__} was not started: mark its test "
                       f"@pytest.mark.background.with_args({job.__name__}).")
  return future.result(timeout=timeout)


def popen(args, **kwargs) -> subprocess.Popen:
  """subprocess.Popen, remembered so that `stop` can kill it."""
  with _lock:
    if _stopping:
      raise RuntimeError("the test session has ended")
    process = subprocess.Popen(args, **kwargs)
    _processes.add(process)
  return process


def run(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
  """subprocess.run (text mode, output captured) through `popen`."""
  process = popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
  return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def stop() -> None:
  """End of the session: kills what is still running (an interrupted session), starts
  nothing new and cancels jobs that have not started."""
  global _stopping
  with _lock:
    _stopping = True
    for future in _jobs.values():
      future.cancel()
    processes = list(_processes)
  for process in processes:
    if process.poll() is None:
      process.kill()
  _lane.shutdown(wait=True)
