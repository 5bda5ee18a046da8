"""The benchmark peers' own virtual environment, made by the benchmark itself.

imagen-pytorch's declared dependencies would pull a CUDA torch, torchvision, accelerate,
datasets, ... into the environment that runs JAX; so the peer lives in a separate venv
with just what its modules import (torch, einops, beartype, kornia, transformers, tqdm,
imagen-pytorch itself without its dependency list), and runs as a subprocess that
exchanges JSON with the benchmark.

Online (a machine with PyPI): `make_peer_python()` creates the venv on first use.
Offline (a lent GPU machine, a pod VM with no egress): pass `wheels=DIR` holding the
wheels to install with --no-index, and `system_site_packages=True` to reuse a torch that
the machine already has: the venv then also sees the site-packages of the Python running
the benchmark (a .pth file; venv's own flag would show the base interpreter's, which
misses a torch installed in a venv, as on images that ship one).
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv

PEER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "imagen_jax", "peer-venv")
# torch==2.13.0 is the CPU build this project pins for parity tests; a bare "torch" from
# PyPI would be a multi-GB CUDA build. transformers brings its own dependency set.
PEER_REQUIREMENTS = ("torch==2.13.0", "transformers", "einops", "tqdm", "beartype", "kornia")
PEER_NO_DEPS = ("imagen-pytorch==2.1.0",)  # its dependency list pulls CUDA torch etc.


def _python(venv_dir: str) -> str:
  return os.path.join(venv_dir, "bin", "python")


def _has_peer(python: str) -> bool:
  probe = ("import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in "
           "('torch', 'einops', 'beartype', 'kornia', 'transformers', 'imagen_pytorch')) else 1)")
  return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def make_peer_python(venv_dir: str = DEFAULT_VENV, *, wheels: str = "",
                     system_site_packages: bool = False, log=print) -> str:
  """The peer venv's python, creating and filling the venv if it lacks the peer."""
  python = _python(venv_dir)
  if os.path.exists(python) and _has_peer(python):
    return python
  log(f"peer: creating the virtual environment {venv_dir} (imagen-pytorch, torch, ...)")
  venv.EnvBuilder(with_pip=True).create(venv_dir)
  if system_site_packages:
    site_dir = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site_dir, "_benchmark_parent_site.pth"), "w") as f:
      f.write("\n".join(p for p in site.getsitepackages() if os.path.isdir(p)) + "\n")
  pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
  if wheels:
    pip += ["--no-index", "--find-links", wheels]
  for packages, extra in ((PEER_REQUIREMENTS, []), (PEER_NO_DEPS, ["--no-deps"])):
    needed = [p for p in packages if not (system_site_packages and _importable(python, p))]
    if needed:
      subprocess.run(pip + extra + needed, check=True)
  if not _has_peer(python):
    raise RuntimeError(f"the peer venv {venv_dir} still cannot import imagen-pytorch's needs")
  return python


def _importable(python: str, requirement: str) -> bool:
  module = requirement.split("==")[0].replace("-", "_")
  probe = f"import importlib.util as u, sys; sys.exit(0 if u.find_spec({module!r}) else 1)"
  return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def _peer_command(python: str, spec: dict, env: dict | None = None) -> tuple[list, dict]:
  """The peer's argv and environment (ours, which carries a preloaded malloc over).

  On a CPU the peer's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, unless the
  variable is set): spin-waiting threads made it 10-30x slower whenever another process
  held a core (bench/README.md), and JAX's own threads do not spin."""
  if spec.get("device") == "cpu":
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **(env or {})}
  return ([python, os.path.join(PEER_DIR, "imagen_pytorch_peer.py"), json.dumps(spec)],
          {**os.environ, **(env or {})})


def run_peer(python: str, spec: dict, *, env: dict | None = None, timeout: float = 3600) -> dict:
  """Runs bench/peers/imagen_pytorch_peer.py with `spec` in the peer's python; returns
  its result (raises with the peer's output if it printed none)."""
  argv, env = _peer_command(python, spec, env)
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith("PEER_RESULT "):
      return json.loads(line[len("PEER_RESULT "):])
  raise RuntimeError(f"the peer failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-5000:]}")


class InterleavedPeer:
  """The peer as a running process whose timed rounds the caller interleaves with its own:

    with InterleavedPeer(python, {**spec, "rounds": R}) as peer:   # builds, warms up
      for _ in range(R):
        ... our steps ...;  peer_times = peer.round()               # its `steps` steps
    result = peer.result                                            # as run_peer's

  Both processes hold their memory the whole time (fine on a CPU; on an accelerator only
  when both models fit at once). The peer's stderr goes to a file, so a chatty peer cannot
  fill a pipe and stall; its tail is in the error if the peer dies."""

  def __init__(self, python: str, spec: dict):
    import tempfile
    if not spec.get("rounds"):
      raise ValueError("InterleavedPeer needs spec['rounds'] >= 1")
    self.rounds, self.result = spec["rounds"], None
    argv, env = _peer_command(python, spec)
    self._stderr = tempfile.TemporaryFile(mode="w+")
    self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._stderr, text=True, env=env)
    self._stdout = []
    self._expect("PEER_READY")

  def _expect(self, prefix: str) -> str:
    """The rest of the peer's next stdout line starting with `prefix`."""
    for line in self._proc.stdout:
      self._stdout.append(line)
      if line.startswith(prefix):
        return line[len(prefix):].strip()
    self._proc.wait(timeout=60)
    self._stderr.seek(0)
    raise RuntimeError(f"the peer ended (exit {self._proc.returncode}) before "
                       f"{prefix.strip()!r}:\n{''.join(self._stdout)[-3000:]}\n"
                       f"{self._stderr.read()[-5000:]}")

  def round(self) -> list:
    """Runs one round of the peer's timed steps; returns their times (seconds)."""
    self._proc.stdin.write("go\n")
    self._proc.stdin.flush()
    times = json.loads(self._expect("PEER_ROUND "))
    self.rounds -= 1
    if not self.rounds:
      self.result = json.loads(self._expect("PEER_RESULT "))
    return times

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def close(self):
    """Ends the peer (killed if it still has rounds to run)."""
    if self._proc.poll() is None and self.rounds:
      self._proc.kill()
    self._proc.wait()
    self._stderr.close()


if __name__ == "__main__":  # python bench/peer_env.py [VENV_DIR]: just make the venv
  print(make_peer_python(*(sys.argv[1:2] or [DEFAULT_VENV])))
