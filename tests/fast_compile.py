"""The XLA flags of every test process: conftest.py sets them for the session, and the
tests that start subprocesses (the command lines, several hosts) pass them on.

Test programs are tiny and most run once or a few times, so compile time, not run time,
is what the suite spends (about half its CPU time):
- `--xla_backend_optimization_level=0`: without LLVM's optimisations XLA's CPU backend
  compiles ~4x faster.
- `--xla_cpu_use_fusion_emitters=false`: XLA's newer CPU fusion emitters build and run an
  MLIR pass pipeline per fusion, and a train step has ~14 fusions per parameter (the
  optimizer's bookkeeping is per leaf). The LLVM IR emitters compile the same programs
  for about half the CPU time: the minimal base's train step 10.0-10.4 -> 4.9-5.9 CPU-s
  (three compiles each), one `python -m imagen_jax.train` of it 41 -> 35 (2-core CPU,
  cold cache, session 11).
  The newer emitters also compile in parallel threads, which hides their cost in wall
  time (session 9 measured wall time and saw no gain); the suite keeps both cores busy,
  so CPU time is what counts.
"""
FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS of a test process; `devices`: simulated CPU devices (None: XLA's one, or
  what the process's config.cpu_devices asks for)."""
  count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
  return count + FLAGS


# The exception: the samplers' statistical tests loop hundreds of denoiser calls over
# 20,000 samples, where run time dominates. XLA's backend optimisations cut it ~3x there
# (DDPM, 500 steps: 9.1 -> 3.2 CPU-s) for ~0.3 s more compile time.
LONG_LOOP_OPTIONS = {"xla_backend_optimization_level": 1}


def compile_sampler(jitted, *args, calls: int):
  """`jitted` compiled for `args`, with LONG_LOOP_OPTIONS when it makes more than 100
  denoiser calls (`diffusion.make_plan(...).calls`)."""
  return jitted.lower(*args).compile(LONG_LOOP_OPTIONS if calls > 100 else None)
