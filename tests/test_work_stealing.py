"""The helper process of tests/work_stealing.py reports what it ran as the session's own: a
test that fails in the helper fails the session, and a helper that dies fails the tests it
had taken. A nested pytest session over three small files, with this directory's hooks."""
import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

# This directory's conftest.py, loaded under another name (the nested one is `conftest`).
CONFTEST = f"""
import importlib.util
import sys
sys.path.insert(0, {TESTS!r})
_spec = importlib.util.spec_from_file_location("suite_conftest", {TESTS!r} + "/conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
pytest_configure = _suite.pytest_configure
pytest_collection_modifyitems = _suite.pytest_collection_modifyitems
pytest_runtest_protocol = _suite.pytest_runtest_protocol
pytest_sessionfinish = _suite.pytest_sessionfinish
pytest_terminal_summary = _suite.pytest_terminal_summary
"""

# The session starts with test_a (the helper takes files from the end), which waits until
# the helper has taken test_c and then test_b, and finished with them.
TEST_A = """
import time
import work_stealing

def test_waits_for_the_helper():
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline:
    with work_stealing._lock:
      taken = list(work_stealing._taken)
    if len(taken) == 2 and all(work_stealing._finished[n].is_set()
                               for f in taken for n in work_stealing._nodeids[f]):
      return
    time.sleep(0.1)
  raise AssertionError(f"the helper took {taken}")
"""

TEST_B = """
import os

def test_dies_in_the_helper():
  if os.environ.get("WORK_STEALING_NODEIDS"):
    os._exit(3)

def test_after_it():
  pass
"""

TEST_C = """
def test_passes():
  pass

def test_fails():
  assert 1 + 1 == 3, "deliberately"
"""


def test_helper_failures_fail_the_session(tmp_path):
  for name, text in (("conftest.py", CONFTEST), ("test_a.py", TEST_A), ("test_b.py", TEST_B),
                     ("test_c.py", TEST_C)):
    (tmp_path / name).write_text(textwrap.dedent(text))
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("WORK_STEALING_") and k != "TESTS_HELPER"}
  env["COLUMNS"] = "300"  # the short summary's lines whole
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rfE", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  out = result.stdout
  assert result.returncode == 1, out[-3000:] + result.stderr[-3000:]
  assert "helper process: 4 tests of test_c.py, test_b.py" in out, out[-3000:]
  assert "3 failed, 2 passed" in out, out[-3000:]
  # The helper's own failure, replayed with its message...
  assert "FAILED test_c.py::test_fails - AssertionError: deliberately" in out, out[-3000:]
  # ... and the tests it had taken when it died: failed, with its log.
  for name in ("test_dies_in_the_helper", "test_after_it"):
    assert f"FAILED test_b.py::{name} - The helper pytest process" in out, out[-3000:]
  assert "it exited while running test_b.py (exit code 3)" in out, out[-3000:]
