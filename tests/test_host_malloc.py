"""imagen_jax.host_malloc: when entry points re-execute themselves with a preloaded malloc,
and that the re-executed process is the same command with the library really mapped."""
import ctypes.util
import os
import subprocess
import sys

import pytest

from imagen_jax import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = host_malloc.find_tcmalloc()


def _finder(known):
  return lambda name: known.get(name)


@pytest.mark.parametrize("environ, known, expected", [
    ({}, {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"}, "libtcmalloc_minimal.so.4"),
    ({}, {"tcmalloc": "libtcmalloc.so.4"}, "libtcmalloc.so.4"),  # the full one will do
    ({}, {}, None),                                               # none here: glibc
    ({"IMAGEN_JAX_MALLOC": "system"}, {"tcmalloc": "libtcmalloc.so.4"}, None),
    ({"LD_PRELOAD": "libjemalloc.so.2"}, {"tcmalloc": "libtcmalloc.so.4"}, None),  # theirs
    ({"IMAGEN_JAX_MALLOC": "libjemalloc.so.2"}, {}, "libjemalloc.so.2"),
])
def test_what_is_preloaded_when(environ, known, expected):
  assert host_malloc.library_to_preload(environ, _finder(known)) == expected


def test_a_missing_library_path_is_an_error_naming_the_variable():
  with pytest.raises(FileNotFoundError, match="IMAGEN_JAX_MALLOC=/nonexistent/libx.so"):
    host_malloc.library_to_preload({"IMAGEN_JAX_MALLOC": "/nonexistent/libx.so"})


def test_reexec_keeps_the_command_and_adds_the_preload():
  calls = []
  host_malloc.reexec(["python", "-m", "imagen_jax.train", "--workdir=w"],
                     environ={"IMAGEN_JAX_MALLOC": "libfoo.so.1", "KEEP": "1"},
                     execve=lambda *a: calls.append(a))
  (exe, argv, env), = calls
  assert exe == sys.executable and argv == [sys.executable, "-m", "imagen_jax.train",
                                            "--workdir=w"]
  assert env["LD_PRELOAD"] == "libfoo.so.1" and env["KEEP"] == "1"
  calls.clear()
  host_malloc.reexec(["python"], environ={"IMAGEN_JAX_MALLOC": "system"},
                     execve=lambda *a: calls.append(a))
  assert not calls


_CHILD = ("import sys; from imagen_jax import host_malloc; host_malloc.reexec(); "
          "import os; print(os.environ.get('LD_PRELOAD'), sys.argv[1:], "
          "host_malloc.preloaded_allocator())")


def _run_child(env_extra):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_malloc.ENV)}
  return subprocess.run([sys.executable, "-c", _CHILD, "a", "--b=1"], cwd=ROOT,
                        env={**env, **env_extra}, capture_output=True, text=True,
                        timeout=120, check=True)


def test_a_real_reexec_runs_the_same_command_once():
  """Through exec: the library (here libm, harmless to preload anywhere) is in the new
  process's LD_PRELOAD, the arguments survive, and the new process does not exec again."""
  libm = ctypes.util.find_library("m")
  if libm is None:
    pytest.skip("the dynamic linker does not know libm here (not glibc Linux)")
  out = _run_child({host_malloc.ENV: libm})
  assert out.stdout.split("[")[0].strip() == libm
  assert "['a', '--b=1']" in out.stdout
  assert out.stderr.count("re-executing") == 1
  assert out.stdout.strip().endswith("glibc")  # libm is not an allocator
  assert _run_child({host_malloc.ENV: "system"}).stdout.startswith("None")


@pytest.mark.skipif(TCMALLOC is None, reason="no tcmalloc on this machine "
                    "(apt-get install libtcmalloc-minimal4 to run this test)")
def test_auto_maps_tcmalloc_into_the_reexecuted_process():
  out = _run_child({})
  assert out.stdout.startswith(TCMALLOC)
  assert "tcmalloc" in out.stdout.strip().split()[-1]  # mapped, per /proc/self/maps
