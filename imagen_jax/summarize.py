r"""Sizes of a config's stages without allocating them: parameters, FLOPs and memory.

  python -m imagen_jax.summarize --config=configs/imagen_cascade.py --num_devices=256
  python -m imagen_jax.summarize --config=configs/imagen_sr256.py --mesh=data=-1,fsdp=16 \
      --num_devices=128 --json

Per stage:
- **params**: the U-Net's parameter count, from `jax.eval_shape` of its init.
- **train FLOPs / image**: model FLOPs of one training example, forward + backward, at the
  training shape (the crop, for stages with `train_crop`). Counted analytically from the
  traced jaxpr of the gradient (`jax.make_jaxpr` on abstract values; nothing is compiled
  or run): 2 x multiply-adds of every `dot_general` and `conv_general_dilated`, the
  convention of MFU (elementwise ops, norms and softmax are not counted; for an input
  gradient of a strided conv the zeros its dilated input holds are not counted either).
  Rematerialisation is switched off for the count, so these are model FLOPs, not the
  hardware FLOPs of a remat run. The frozen text encoder is not included (it is
  `text_flops_per_image`, forward only, for runs that do not precompute embeddings).
- **sample FLOPs / image**: one forward pass at the sampling resolution (one denoiser call
  per image; classifier-free guidance doubles it).
- **memory / device**: params + optimizer state + EMA of the train state, float32, per
  device of the configured mesh (or `--mesh`), sharded by the config's logical axis
  rules exactly as training shards them (`parallel.mesh.logical_sharding` on an
  `AbstractMesh`, so a pod mesh can be summarised on a laptop: `--num_devices`).
  Activations are not included.

`train_flops_per_image(config, stage_name)` is the function a benchmark imports for MFU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.models import UNet, dummy_inputs
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import stages as stages_lib
from imagen_jax.train import state as state_lib

# --------------------------------------------------------------------------------------
# FLOPs of a jaxpr.


def _sub_jaxprs(value):
  """The jaxprs held in an equation parameter (a jaxpr, a closed jaxpr, or a sequence)."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def _dot_general_flops(eqn) -> int:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  return 2 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _conv_flops(eqn) -> int:
  dims = eqn.params["dimension_numbers"]
  rhs_shape = eqn.invars[1].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  rhs_spec = dims.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
  macs_per_output = rhs_shape[rhs_spec[1]] * math.prod(rhs_shape[d] for d in rhs_spec[2:])
  # A dilated input (the input gradient of a strided conv) is mostly zeros: count the
  # multiply-adds with real inputs, i.e. those of the forward conv it transposes.
  lhs_dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
  return 2 * math.prod(out_shape) * macs_per_output // lhs_dilation


def jaxpr_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general and convolution in a (closed) jaxpr,
  recursing into sub-jaxprs (jit, remat, custom derivatives; a scan counts `length`
  times; a cond counts its most expensive branch)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


# --------------------------------------------------------------------------------------
# One stage.


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _stage_inputs(spec: stages_lib.StageSpec, text_len: int, size: int) -> tuple:
  """Batch-1 U-Net inputs at image side `size` (the low-res input scaled alike)."""
  lowres = size * spec.lowres_resolution // spec.resolution if spec.lowres_resolution else None
  return dummy_inputs(spec.unet, size, 1, text_len, lowres)


def train_size(spec: stages_lib.StageSpec) -> int:
  """Side of the images a stage trains on (its crop, if it has one)."""
  return spec.train_crop or spec.resolution


def abstract_params(spec: stages_lib.StageSpec, text_len: int = 8):
  """The U-Net's params as ShapeDtypeStructs (eval_shape of init; nothing allocated)."""
  model = UNet(spec.unet)
  inputs = _stage_inputs(spec, text_len, train_size(spec))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  return nn.unbox(variables)["params"]


def unet_flops(spec: stages_lib.StageSpec, *, size: int, text_len: int,
               train: bool) -> int:
  """Model FLOPs of one image through the U-Net at side `size`: forward + backward with
  respect to the params (train=True) or forward only."""
  # Model FLOPs, not hardware FLOPs: no remat, and attention as einsums (a fused kernel is a
  # custom call whose FLOPs the jaxpr does not show).
  unet_cfg = dataclasses.replace(spec.unet, remat="none", attention_impl="einsum")
  model = UNet(unet_cfg)
  params = abstract_params(dataclasses.replace(spec, unet=unet_cfg))
  x, t, cond = _abstract(_stage_inputs(spec, text_len, size))

  def forward(params, x, t, cond):
    return model.apply({"params": params}, x, t, cond, train=train,
                       rngs={"dropout": jax.random.key(0)} if train else None)

  if train:
    def loss(params, x, t, cond):  # the diffusion loss's shape: a mean squared error
      return jnp.mean(jnp.square(forward(params, x, t, cond) - x))
    fn = jax.grad(loss)
  else:
    fn = forward
  return jaxpr_flops(jax.make_jaxpr(fn)(params, x, t, cond))


def _text_flops(config) -> int:
  """Forward FLOPs of the frozen text encoder on one caption of max_length tokens."""
  from imagen_jax.text import T5Encoder, param_shapes
  t5 = stages_lib.t5_config(config)
  length = config.text.max_length
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  params = param_shapes(t5)
  encoder = T5Encoder(t5)
  fn = lambda p, i, m: encoder.apply({"params": p}, i, m)
  return jaxpr_flops(jax.make_jaxpr(fn)(params, ids, mask))


def train_flops_per_image(config, stage_name: str) -> int:
  """Model FLOPs (forward + backward) of one training image of a stage's U-Net.

  For MFU: achieved images/s x this / (devices x peak FLOP/s). Analytic count from the
  jaxpr (see the module docstring); the text encoder is excluded.
  """
  spec = stages_lib.stage_spec(config, stage_name)
  return unet_flops(spec, size=train_size(spec), text_len=config.text.max_length, train=True)


def sample_flops_per_image(config, stage_name: str) -> int:
  """Forward FLOPs of one denoiser call on one image at the stage's sampling resolution."""
  spec = stages_lib.stage_spec(config, stage_name)
  return unet_flops(spec, size=spec.resolution, text_len=config.text.max_length, train=False)


def abstract_mesh(mesh_shape: Mapping[str, int], num_devices: int) -> jax.sharding.AbstractMesh:
  """A mesh of named axis sizes over `num_devices` devices that need not exist."""
  shape = mesh_lib.resolve_mesh_shape(mesh_shape, num_devices)
  return jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape.keys()),
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def state_memory_per_device(config, stage_name: str, mesh) -> dict[str, int]:
  """Bytes per device of params, optimizer state and EMA of a stage's train state.

  `mesh`: a Mesh or AbstractMesh. Leaves are sharded as `train.state` shards them (the
  logical axis rules of the config, dimensions a mesh axis does not divide replicated);
  a device holds the largest shard of each leaf.
  """
  spec = stages_lib.stage_spec(config, stage_name)
  rules = mesh_lib.rules_from_config(config.axis_rules)
  boxed = state_lib.boxed_train_state(  # the train state's own init, traced
      UNet(spec.unet), _stage_inputs(spec, 8, train_size(spec)),
      state_lib.make_optimizer(spec.optimizer), mesh=None, rules=rules)
  shardings = mesh_lib.logical_sharding(boxed, mesh, rules)
  values = state_lib.unbox_state(boxed)

  def nbytes(tree, sharding_tree) -> int:
    leaves = jax.tree.leaves(tree)
    shard = jax.tree.leaves(sharding_tree)
    assert len(leaves) == len(shard)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, shard))

  out = {"params": nbytes(values.params, shardings.params),
         "opt_state": nbytes(values.opt_state, shardings.opt_state),
         "ema": nbytes(values.ema_params, shardings.ema_params)}
  out["total"] = sum(out.values())
  return out


def summarize(config, *, num_devices: Optional[int] = None,
              mesh_shape: Optional[Mapping[str, int]] = None,
              stages: Optional[list] = None, text_flops: bool = True) -> dict[str, Any]:
  """The summary of every stage (or `stages`) of a config, as a JSON-ready dict."""
  num_devices = num_devices or jax.device_count()
  if mesh_shape:  # config.mesh's other axes (named by the rules) get size 1
    mesh_shape = dict(mesh_shape, **{a: 1 for a in config.mesh if a not in mesh_shape})
  try:
    mesh = abstract_mesh(dict(mesh_shape or config.mesh), num_devices)
  except ValueError as e:
    raise ValueError(f"{e} (Summarising {num_devices} devices: pass --num_devices=N for a "
                     "mesh that is not present, e.g. 256 for the paper's base model.)") from None
  rules = mesh_lib.rules_from_config(config.axis_rules)
  mesh_lib.check_rules(rules, mesh)
  rows = []
  for name in stages or config.stage_order:
    spec = stages_lib.stage_spec(config, name)
    params = abstract_params(spec)
    memory = state_memory_per_device(config, name, mesh)
    rows.append(dict(
        stage=name, resolution=spec.resolution, lowres_resolution=spec.lowres_resolution,
        train_size=train_size(spec),
        params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
        train_flops_per_image=train_flops_per_image(config, name),
        sample_flops_per_image=sample_flops_per_image(config, name),
        optimizer=spec.optimizer.name, batch_size=spec.train.batch_size,
        memory_per_device=memory))
  summary = dict(mesh=dict(mesh.shape), num_devices=num_devices, stages=rows,
                 text=dict(d_model=config.text.d_model, num_layers=config.text.num_layers,
                           max_length=config.text.max_length))
  if text_flops:
    summary["text"]["flops_per_caption"] = _text_flops(config)
  return summary


def _si(x: float, unit: str = "") -> str:
  for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= factor:
      return f"{x / factor:.2f} {prefix}{unit}"
  return f"{x:.0f} {unit}".strip()


def _bytes(n: int) -> str:
  for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if n >= factor:
      return f"{n / factor:.2f} {unit}"
  return f"{n} B"


def format_table(summary: dict) -> str:
  """A Markdown table of a summary."""
  mesh = ", ".join(f"{k}={v}" for k, v in summary["mesh"].items())
  lines = [f"mesh {mesh} ({summary['num_devices']} devices)", "",
           "| stage | resolution | params | train FLOPs/img (fwd+bwd) | sample FLOPs/img "
           "(1 fwd) | memory/device: params + opt + EMA |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in summary["stages"]:
    res = (f"{r['lowres_resolution']}->{r['resolution']}" if r["lowres_resolution"]
           else f"{r['resolution']}")
    if r["train_size"] != r["resolution"]:
      res += f" (trains on {r['train_size']} crops)"
    m = r["memory_per_device"]
    lines.append(
        f"| {r['stage']} | {res} | {r['params'] / 1e6:.1f}M | "
        f"{_si(r['train_flops_per_image'], 'FLOP')} | {_si(r['sample_flops_per_image'], 'FLOP')} | "
        f"{_bytes(m['total'])} = {_bytes(m['params'])} + {_bytes(m['opt_state'])} "
        f"({r['optimizer']}) + {_bytes(m['ema'])} |")
  text = summary["text"]
  if "flops_per_caption" in text:
    lines += ["", f"text encoder (d_model {text['d_model']}, {text['num_layers']} layers): "
              f"{_si(text['flops_per_caption'], 'FLOP')} per caption of {text['max_length']} "
              "tokens (forward; not in the U-Net figures)"]
  return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=-1,fsdp=8' -> {'data': -1, 'fsdp': 8} (order kept)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, size = part.partition("=")
    if not sep:
      raise ValueError(f"--mesh: {part!r} is not NAME=SIZE (e.g. data=-1,fsdp=8).")
    out[name.strip()] = int(size)
  return out


def main(argv):
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  config = FLAGS.config
  mesh_shape = parse_mesh(FLAGS.mesh) if FLAGS.mesh else None
  summary = summarize(config, num_devices=FLAGS.num_devices, mesh_shape=mesh_shape,
                      stages=[FLAGS.stage] if FLAGS.stage else None,
                      text_flops=FLAGS.text_flops)
  if FLAGS.json:
    json.dump(summary, sys.stdout, indent=2)
    print()
  else:
    print(format_table(summary))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
  flags.DEFINE_integer("num_devices", None, "Devices of the mesh (default: those present); "
                       "need not exist, e.g. 256 for a TPU pod slice.")
  flags.DEFINE_string("mesh", None, "Mesh override, e.g. data=-1,fsdp=8 (default: config.mesh); "
                      "config.mesh axes it does not name get size 1.")
  flags.DEFINE_string("stage", None, "Only this stage (default: all).")
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.DEFINE_bool("text_flops", True, "Also count the text encoder's forward FLOPs.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
