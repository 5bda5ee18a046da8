"""A helper pytest process that takes in-process test files from the end of the queue once
the background lane (tests/background.py) has run its jobs.

Why: this machine has 2 cores. The in-process tests keep one busy, the lane's subprocesses
the other, and the lane ends minutes before the in-process tests do; from then on one core
idles. So the lane's last job starts a second pytest process (the helper) on the test files
that the session has not started yet, and hands it those files one at a time, last first,
while the session goes on from the front; they meet in the middle. A file is the unit (its
module-scoped fixtures are built once, in one process). The session replays the helper's
reports as its own, so the summary, `-x`, `--durations` and the exit status are as if it
had run them; a helper that dies fails the tests it had taken, with its log.

Both processes share the persistent compilation cache and have 8 simulated devices, so the
helper loads what the session has already compiled.

`TESTS_HELPER=0` turns the helper off. This module is also the helper's pytest plugin
(`-p work_stealing`): it keeps the node ids it was given, reads file names on one pipe,
runs their tests and writes the serialized reports on another.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from _pytest.reports import TestReport

import background

# The helper's environment: these tell the plugin it is the helper and where its pipes are.
_NODEIDS = "WORK_STEALING_NODEIDS"
_COMMANDS_FD = "WORK_STEALING_COMMANDS_FD"
_REPORTS_FD = "WORK_STEALING_REPORTS_FD"
# Starting the helper costs ~15 CPU-seconds (imports and collection): not worth it for less.
MIN_FILES = 2
TIMEOUT_S = 1800

_lock = threading.Lock()
_files: list[str] = []                # the session's in-process test files, in run order
_nodeids: dict[str, list[str]] = {}   # file -> node ids of its selected tests
_started: set[str] = set()            # files the session has begun
_taken: list[str] = []                # files the helper took, in the order it took them
_reports: dict[str, list] = {}       # node id -> the helper's reports (TestReport)
_finished: dict[str, threading.Event] = {}  # node id -> set once its reports are all in
_failure = ""                         # why the helper stopped early, if it did
_config: list = []                    # the session's pytest config (for deserializing)


def is_helper() -> bool:
  return _NODEIDS in os.environ


def enabled() -> bool:
  """TESTS_HELPER=0 runs every test in the session's own process (for debugging, or to time
  tests by themselves)."""
  return os.environ.get("TESTS_HELPER", "1") != "0"


def _file(nodeid: str) -> str:
  return nodeid.split("::")[0]


def plan(config, items) -> bool:
  """The session's in-process tests, in the order it will run them. Returns whether there
  are enough files for a helper."""
  _config.append(config)
  for item in items:
    path = _file(item.nodeid)
    if path not in _nodeids:
      _files.append(path)
      _nodeids[path] = []
    _nodeids[path].append(item.nodeid)
    _finished[item.nodeid] = threading.Event()
  return len(_files) >= MIN_FILES


def run_or_replay(item):
  """In the session: None to run `item` here, or True once the helper's reports for it
  have been replayed (the helper took its file)."""
  path = _file(item.nodeid)
  with _lock:
    if path not in _nodeids:
      return None  # a background test, or not planned
    if path not in _taken:
      _started.add(path)
      return None
  if not _finished[item.nodeid].wait(TIMEOUT_S):
    _fail(item.nodeid, f"the helper pytest process did not report within {TIMEOUT_S} s")
  item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
  for report in _reports[item.nodeid]:
    item.ihook.pytest_runtest_logreport(report=report)
  item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
  return True


def summary() -> str:
  """One line for the session's summary ("" if the helper took nothing)."""
  if not _taken:
    return ""
  count = sum(len(_nodeids[f]) for f in _taken)
  line = f"helper process: {count} tests of {', '.join(os.path.basename(f) for f in _taken)}"
  return line + (f" ({_failure})" if _failure else "")


def _fail(nodeid: str, message: str) -> None:
  """Failure reports for a test the helper took but did not finish."""
  path, _, name = nodeid.partition("::")
  _reports[nodeid] = [
      TestReport(nodeid, (path, None, name), {}, outcome, longrepr, when)
      for outcome, longrepr, when in (("passed", None, "setup"), ("failed", message, "call"),
                                      ("passed", None, "teardown"))]
  _finished[nodeid].set()


def help_from_the_end(directory) -> str:
  """The lane's last job: starts the helper on the files the session has not begun, then
  hands it them one at a time from the end until the two meet."""
  global _failure
  with _lock:
    files = [f for f in _files if f not in _started]
  if len(files) < MIN_FILES:
    return f"not started: {len(files)} test files left"
  nodeids = os.path.join(directory, "nodeids.json")
  with open(nodeids, "w") as f:
    json.dump([n for path in files for n in _nodeids[path]], f)
  log_path = os.path.join(directory, "helper.log")
  commands_r, commands_w = os.pipe()
  reports_r, reports_w = os.pipe()
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, **{_NODEIDS: nodeids, _COMMANDS_FD: str(commands_r),
                            _REPORTS_FD: str(reports_w)})
  env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  with open(log_path, "w") as log:
    process = background.popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "work_stealing",
         f"--rootdir={_config[0].rootpath}", f"--basetemp={os.path.join(directory, 'tmp')}",
         *files],
        cwd=_config[0].rootpath, env=env, stdout=log, stderr=subprocess.STDOUT,
        pass_fds=(commands_r, reports_w))
  os.close(commands_r)
  os.close(reports_w)
  commands = os.fdopen(commands_w, "w", buffering=1)
  reports = os.fdopen(reports_r)
  current = None
  try:
    if reports.readline().strip() != "ready":
      raise RuntimeError("it exited before collecting its tests")
    while True:
      with _lock:
        left = [f for f in files if f not in _started and f not in _taken]
        if not left:
          break
        current = left[-1]
        _taken.append(current)
      commands.write(current + "\n")
      for line in reports:
        kind, _, payload = line.rstrip("\n").partition(" ")
        if kind == "done":
          break
        config = _config[0]
        report = config.hook.pytest_report_from_serializable(config=config,
                                                             data=json.loads(payload))
        report.location = tuple(report.location)  # a list after JSON
        _reports.setdefault(report.nodeid, []).append(report)
        if report.when == "teardown":
          _finished[report.nodeid].set()
      else:
        raise RuntimeError(f"it exited while running {current}")
      for nodeid in _nodeids[current]:  # e.g. not collected in the helper
        if not _finished[nodeid].is_set():
          _fail(nodeid, f"The helper pytest process finished {current} without reporting "
                        f"this test; its log: {log_path}")
    commands.close()
    process.wait(timeout=300)
    return f"ran {len(_taken)} of {len(files)} files"
  except Exception as e:  # pylint: disable=broad-except
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      pass
    _failure = f"the helper failed: {e} (exit code {process.poll()})"
    raise
  finally:
    if process.poll() is None:
      process.kill()
    with _lock:
      unfinished = [n for f in _taken for n in _nodeids[f] if not _finished[n].is_set()]
    # (Once every test it took has reported, its exit code does not matter: the session may
    # have killed it while it was tearing down.)
    if unfinished:
      with open(log_path) as f:
        tail = f.read()[-4000:]
    for nodeid in unfinished:
      _fail(nodeid, f"The helper pytest process (tests/work_stealing.py) stopped before "
                    f"finishing this test: {_failure or 'it exited'}. Its log ({log_path}) "
                    f"ends:\n{tail}")


# ---- The helper's side (a pytest plugin, loaded with -p work_stealing). ----

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
  """Only the tests the session selected (its -k / -m), before conftest starts any job."""
  if not is_helper():
    return
  with open(os.environ[_NODEIDS]) as f:
    wanted = set(json.load(f))
  config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in wanted])
  items[:] = [i for i in items if i.nodeid in wanted]


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
  """Runs the files the session hands over, one at a time, until it closes the pipe."""
  if not is_helper():
    return None
  out = os.fdopen(int(os.environ[_REPORTS_FD]), "w", buffering=1)
  _helper_out.append((session.config, out))
  by_file: dict[str, list] = {}
  for item in session.items:
    by_file.setdefault(_file(item.nodeid), []).append(item)
  out.write("ready\n")
  with os.fdopen(int(os.environ[_COMMANDS_FD])) as commands:
    for line in commands:
      path = line.strip()
      items = by_file.pop(path, [])
      # Past a file's last test: any test of another file, so that its module fixtures are
      # torn down but the session's are kept (pytest tears those down at the end).
      after = next((other[0] for other in by_file.values() if other), None)
      for i, item in enumerate(items):
        nextitem = items[i + 1] if i + 1 < len(items) else after
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
      out.write(f"done {path}\n")
  return True


_helper_out: list = []  # [(config, the reports pipe)] in the helper


def pytest_runtest_logreport(report):
  """Each phase's report, to the session (which replays it)."""
  if not (is_helper() and _helper_out):
    return
  config, out = _helper_out[0]
  data = config.hook.pytest_report_to_serializable(config=config, report=report)
  out.write("report " + json.dumps(data) + "\n")
