"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

Both must be set before jax is imported anywhere, which is why they live here.
"""
import os

from fast_compile import xla_flags  # tests/fast_compile.py: why these flags

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "imagen_jax_jit"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ---- End-to-end tests whose subprocesses run beside the others (tests/background.py). ----

def pytest_configure(config):
  config.addinivalue_line(
      "markers", "background(job): the test asserts on what `job(directory)` returns; the "
      "job runs in a background thread from the start of the session, and the test last "
      "(mark with `pytest.mark.background.with_args(job)`).")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start only what will be asserted
def pytest_collection_modifyitems(session, config, items):
  import background  # tests/background.py
  import work_stealing  # tests/work_stealing.py

  if config.option.collectonly or work_stealing.is_helper():
    return
  waiting = [item for item in items if item.get_closest_marker("background")]
  for item in waiting:
    (job,) = item.get_closest_marker("background").args
    background.start(job, config._tmp_path_factory.mktemp(job.__name__))
  # The jobs' tests last, so that their jobs have the whole session to run in.
  in_process = [item for item in items if item not in waiting]
  items[:] = in_process + waiting
  # Once its jobs are done, the lane helps with the in-process tests.
  if work_stealing.enabled() and work_stealing.plan(config, in_process):
    help_ = work_stealing.help_from_the_end
    background.start(help_, config._tmp_path_factory.mktemp(help_.__name__))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
  import work_stealing  # tests/work_stealing.py

  return work_stealing.run_or_replay(item)  # None: run it here


def pytest_sessionfinish(session, exitstatus):
  import background  # tests/background.py

  background.stop()


def pytest_terminal_summary(terminalreporter):
  import background  # tests/background.py
  import work_stealing  # tests/work_stealing.py

  for line in (background.summary(), work_stealing.summary()):
    if line:
      terminalreporter.write_line(line)
