"""The train state (params, optimizer state, EMA, step, rng) and its sharded creation."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagen_jax.parallel import distributed
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train.compile_options import run_rarely_options


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # float32, logically partitioned boxes stripped
  opt_state: Any
  ema_params: Any      # float32 exponential moving average of params
  rng: jax.Array       # the run's key; folded with the step inside the train step
  skipped_steps: jax.Array  # steps whose update was dropped for a non-finite loss/gradient


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float
  warmup_steps: int
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  ema_decay: float = 0.9999
  # After warmup: "constant", or "cosine" decay to end_lr_fraction x the rate at
  # decay_steps (counted from step 0, warmup included) and constant after.
  lr_schedule: str = "constant"
  decay_steps: int = 0
  end_lr_fraction: float = 0.0
  # adam | adafactor (optax.adafactor with its default parameters, as the paper's base
  # model; b1, b2 and eps apply to adam only). Adafactor keeps factored second moments
  # (a row and a column vector per matrix), so its state is a fraction of Adam's.
  name: str = "adam"


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup from 0, then constant or cosine-decayed (cfg.lr_schedule)."""
  warmup = max(cfg.warmup_steps, 1)
  if cfg.lr_schedule == "constant":
    return optax.linear_schedule(0.0, cfg.learning_rate, warmup)
  if cfg.lr_schedule == "cosine":
    if cfg.decay_steps <= cfg.warmup_steps:
      raise ValueError(f"optimizer.decay_steps={cfg.decay_steps} must exceed "
                       f"optimizer.warmup_steps={cfg.warmup_steps} for the cosine schedule.")
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, cfg.decay_steps,
        end_value=cfg.learning_rate * cfg.end_lr_fraction)
  raise ValueError(f"optimizer.lr_schedule={cfg.lr_schedule!r} is not one of {LR_SCHEDULES}.")


OPTIMIZERS = ("adam", "adafactor")


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Adam (or Adafactor) with the warmup (+ decay) schedule and global-norm clipping."""
  schedule = learning_rate_schedule(cfg)
  chain = []
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.name == "adam":
    chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  elif cfg.name == "adafactor":
    chain.append(optax.adafactor(schedule))
  else:
    raise ValueError(f"optimizer name={cfg.name!r}: use one of {OPTIMIZERS}.")
  return optax.chain(*chain)


def ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def _init_fn(model: nn.Module, example_inputs: tuple, optimizer):
  """init(key) -> TrainState whose params / opt_state / EMA leaves keep their logical boxes."""

  def init_fn(key):
    init_key, state_key = jax.random.split(key)
    boxed = model.init({"params": init_key, "dropout": init_key}, *example_inputs)["params"]
    params = nn.meta.unbox(boxed)
    # Adam's mu and nu mirror the params: give them the same boxes, hence the same sharding.
    return TrainState(step=jnp.zeros((), jnp.int32), params=boxed,
                      opt_state=_rebox_like(optimizer.init(params), params, boxed),
                      ema_params=boxed, rng=state_key, skipped_steps=jnp.zeros((), jnp.int32))

  return init_fn


def abstract_train_state(model: nn.Module, example_inputs: tuple, optimizer, *, mesh: Mesh,
                         rules) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings) without allocating anything: the target of a restore."""
  boxed = boxed_train_state(model, example_inputs, optimizer, mesh=mesh, rules=rules)
  return unbox_state(boxed), train_state_shardings(boxed, mesh, rules)


def boxed_train_state(model: nn.Module, example_inputs: tuple, optimizer, *,
                      mesh: Mesh | None, rules) -> TrainState:
  """The abstract state (`eval_shape` of init) with the logical boxes of its leaves: the
  same for every mesh (`train_state_shardings` places it on one), so one trace serves many.
  mesh=None traces it under the rules alone (summaries of meshes that are not present)."""
  init_fn = _init_fn(model, example_inputs, optimizer)
  in_mesh = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
  with in_mesh, nn.logical_axis_rules(rules):
    return jax.eval_shape(init_fn, jax.random.key(0))


def train_state_shardings(boxed: TrainState, mesh: Mesh, rules) -> TrainState:
  """The shardings of a `boxed_train_state` on `mesh`: leaves by their logical names;
  step, rng and the skipped-step count replicated."""
  shardings = mesh_lib.logical_sharding(boxed, mesh, rules)
  replicated = NamedSharding(mesh, P())
  return shardings.replace(step=replicated, rng=replicated, skipped_steps=replicated)


def create_train_state(model: nn.Module, example_inputs: tuple, optimizer, *, rng: jax.Array,
                       mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
  """Builds the train state directly in its sharded layout; returns (state, shardings).

  The state is traced with `eval_shape` to read the logical sharding of every leaf, then
  created by `jit(init, out_shardings=...)`, so no device ever holds an unsharded copy.
  """
  _, shardings = abstract_train_state(model, example_inputs, optimizer, mesh=mesh, rules=rules)
  return init_train_state(model, example_inputs, optimizer, rng=rng, mesh=mesh, rules=rules,
                          shardings=shardings), shardings


def init_train_state(model: nn.Module, example_inputs: tuple, optimizer, *, rng: jax.Array,
                     mesh: Mesh, rules, shardings: TrainState) -> TrainState:
  """The initial state, made by `jit(init, out_shardings=shardings)` (the shardings of
  `abstract_train_state`)."""
  init_fn = _init_fn(model, example_inputs, optimizer)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jax.jit(lambda k: unbox_state(init_fn(k)), out_shardings=shardings).lower(rng)
    compiled = lowered.compile(compiler_options=run_rarely_options())
    distributed.barrier("run_init")  # several hosts: run it together (parallel/distributed.py)
    return compiled(rng)


def _rebox_like(opt_state, params, boxed):
  """Puts the params' logical boxes around every params-shaped subtree of opt_state.

  Only leaves of the param's own shape get its box (Adam's moments); others, such as
  Adafactor's factored row / column statistics, stay unboxed and are replicated.
  """
  params_def = jax.tree.structure(params)

  def rebox_leaf(box, leaf):
    return box.replace_boxed(leaf) if leaf.shape == box.unbox().shape else leaf

  def rebox(subtree):
    if jax.tree.structure(subtree) == params_def:
      return jax.tree.map(rebox_leaf, boxed, subtree,
                          is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return subtree

  return jax.tree.map(rebox, opt_state, is_leaf=lambda x: jax.tree.structure(x) == params_def)


def unbox_state(state):
  return jax.tree.map(lambda x: x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x, state,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
