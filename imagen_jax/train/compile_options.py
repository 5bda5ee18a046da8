"""Compiler options by how often a program runs."""
import jax


def run_rarely_options():
  """Options for programs that run once or a few times (train-state init, sample grids).

  On CPU, XLA's backend optimisations cost 2-3x more compile time (10-30 s for the shapes
  U-Nets) than they save at run time in such programs. Elsewhere: the defaults.
  """
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
