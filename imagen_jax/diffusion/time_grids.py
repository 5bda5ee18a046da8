"""Time grids for the samplers: steps + 1 times from t = 1 (noise) down to t = 0 (data).

  'uniform_t':      t_i = 1 - i / steps (the default).
  'uniform_logsnr': log-SNR uniform between logsnr(1) and logsnr(0); the natural grid of
                    DPM-Solver, whose step error is a power of the log-SNR step h.

Which to use: RMS distance from the exact probability-flow ODE solution on Gaussian data
with its exact denoiser (tests/test_samplers.py), at 32 / 128 denoiser calls:

                      cosine                          linear
                      uniform_t     uniform_logsnr    uniform_t     uniform_logsnr
  DDIM                2.3e-2 6.0e-3 5.0e-2 1.3e-2     4.1e-2 1.0e-2 3.4e-2 8.8e-3
  DPM-Solver++(2M)    3.3e-3 2.2e-4 5.2e-3 3.3e-4     1.2e-2 1.3e-3 2.5e-3 1.5e-4
  Heun                1.2e-2 1.5e-3 5.2e-2 3.0e-3     3.2e-2 2.7e-3 2.2e-2 1.3e-3

With the linear schedule 'uniform_logsnr' is better for every sampler (5-9x for
DPM-Solver++); with the cosine schedule 'uniform_t' is, because uniform log-SNR spends
about half its steps at log-SNR < -5 (cosine's logsnr(1) is clipped at -20), where x0
barely changes. EDM's rho = 7 grid was tried and dropped: starting from sigma / alpha =
e^10 at t = 1 it was worse than both for every sampler.

Only grid points 0 .. steps - 1 are denoiser evaluations; the last step jumps from
t_{steps-1} to clean data (the prediction of x0 there), so t_steps = 0 is never evaluated.
Returns the times and their log-SNRs, the log-SNR always recomputed from t, so a
denoiser that only sees t and a solver that steps in log-SNR agree exactly.
"""
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import get_schedule

TIME_GRIDS = ("uniform_t", "uniform_logsnr")


def time_grid(name: str, steps: int, schedule):
  """(times [steps + 1], logsnrs [steps + 1]) float32, times[0] = 1, times[-1] = 0."""
  if name not in TIME_GRIDS:
    raise ValueError(f"Unknown time_grid {name!r}; choose one of {TIME_GRIDS}.")
  schedule = get_schedule(schedule)
  if name == "uniform_t":
    times = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
  else:
    start, end = schedule.logsnr(1.0), schedule.logsnr(0.0)
    logsnrs = start + jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32) * (end - start)
    # Pin the ends: the inverse of a clipped log-SNR is only defined up to the clip.
    times = schedule.t_from_logsnr(logsnrs).at[0].set(1.0).at[-1].set(0.0)
  return times, schedule.logsnr(times)
