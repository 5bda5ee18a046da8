"""The host's malloc: entry points re-execute themselves with tcmalloc preloaded when the
machine has it, because glibc's malloc makes XLA's CPU runtime fault in fresh pages on
every step.

Why. Each execution of a compiled step on the CPU backend allocates its temporary buffer
(tens to hundreds of MB) with posix_memalign and frees it at the end. glibc serves blocks
that large with a fresh mmap and unmaps them on free, so every step touches its whole
working set anew: in the 2-core benchmark, ~300K minor page faults (~1 GB) per step and
~10% of the CPU time in the kernel. glibc's tunables (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD,
M_MMAP_MAX=0, one arena) did not remove them; tcmalloc keeps freed spans for reuse, and
with it a train step takes 8-23% less time (bench/README.md, "Host allocator").

A malloc can only be replaced before anything allocates, hence the re-exec: `reexec()`,
called first thing by an entry point, runs the same command again (same pid, argv and
environment) with LD_PRELOAD naming the library. It does nothing when LD_PRELOAD is
already set (the user's choice, or this is the re-executed process) or no library is
found. IMAGEN_JAX_MALLOC chooses:
  auto     (default) libtcmalloc_minimal / libtcmalloc if the dynamic linker knows it
           (Debian/Ubuntu: apt-get install libtcmalloc-minimal4);
  system   glibc's malloc, no re-exec;
  NAME     a library to preload instead (a path, or a soname such as libjemalloc.so.2).
Child processes (the imagen-pytorch peer of bench/) inherit the preload, so a benchmark's
two sides run on the same allocator.
"""
import ctypes.util
import os
import sys

ENV = "IMAGEN_JAX_MALLOC"
# gperftools reports every allocation above 1 GiB on stderr; a checkpoint or a large
# batch is not news.
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc(find_library=ctypes.util.find_library) -> str | None:
  """The soname of a tcmalloc the dynamic linker can load, or None."""
  for name in ("tcmalloc_minimal", "tcmalloc"):
    lib = find_library(name)
    if lib:
      return lib
  return None


def library_to_preload(environ, find_library=ctypes.util.find_library) -> str | None:
  """What `reexec` would preload given this environment: None when it would not re-exec."""
  choice = environ.get(ENV, "auto").strip() or "auto"
  if choice == "system" or environ.get("LD_PRELOAD"):
    return None
  if choice == "auto":
    return find_tcmalloc(find_library)
  if "/" in choice and not os.path.isfile(choice):
    raise FileNotFoundError(f"{ENV}={choice}: no such file. Use a library path, a soname "
                            "(libjemalloc.so.2), 'auto' or 'system'.")
  return choice


def reexec(argv: list | None = None, environ=None, execve=os.execve) -> None:
  """Re-executes this process with the allocator preloaded, if `library_to_preload` says
  so; otherwise returns. `argv` defaults to the command as Python received it
  (sys.orig_argv: `python -m imagen_jax.train --flags` stays that)."""
  environ = os.environ if environ is None else environ
  lib = library_to_preload(environ)
  if lib is None:
    return
  argv = list(sys.orig_argv if argv is None else argv)
  env = {**_QUIET, **environ, "LD_PRELOAD": lib}
  print(f"[imagen_jax] re-executing with {lib} preloaded (host malloc; {ENV}=system "
        "to keep glibc's)", file=sys.stderr, flush=True)
  sys.stdout.flush()
  execve(sys.executable, [sys.executable] + argv[1:], env)


def preloaded_allocator() -> str:
  """The preloaded malloc library mapped into this process ('glibc' when none is): what
  benchmarks record beside their figures."""
  try:
    with open("/proc/self/maps") as f:
      paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
  except OSError:
    return "unknown (no /proc/self/maps)"
  found = sorted(p for p in paths if any(k in os.path.basename(p)
                                         for k in ("tcmalloc", "jemalloc", "mimalloc")))
  return ", ".join(found) or "glibc"
