r"""Training throughput and MFU of one stage's real train step, optionally beside
imagen-pytorch on the same machine in the same run.

Runs the exact jitted step of `imagen_jax.train` (diffusion loss, optimizer, EMA, on the
config's mesh) on random data of the stage's shapes, in two text modes:
  precomputed  the batch carries T5 embeddings (`config.stages.<s>.embeddings_dir` runs;
               what the paper and NVIDIA's figures do: T5 is not counted);
  encoder      the frozen T5 runs inside the step on token ids.
For each: compile time, steady-state step time (median of --steps after --warmup),
images/s (total and per device), model TFLOP/s per device from the analytic FLOP count
(`imagen_jax.summarize.train_flops_per_image`: U-Net forward + backward, no remat, text
encoder excluded), MFU against `imagen_jax.perf.PEAKS` (or --peak_tflops, or on a CPU the
measured matmul rate, labelled so), and peak memory.

--peer also runs imagen-pytorch's Unet + Imagen with the same hyperparameters, batch,
resolution, precision (bf16 autocast where we compute in bf16) and optimizer (Adam, same
betas/eps/lr, gradient clipping, an EMA update), from precomputed embeddings like ours,
in a virtual environment the script makes (bench/peer_env.py), and prints the ratio.

  python bench/train_step.py --config=configs/bench_cpu.py --stage=base --peer
  python bench/train_step.py --config=configs/imagen_base64.py --stage=base --batch=64 \
      --config.stages.base.optimizer.name=adam --peer --peer_venv=/tmp/peer \
      --peer_wheels=.whl --peer_system_site_packages
--profile_dir=DIR also traces --profile_steps steps of each text mode with jax.profiler
(DIR/<mode>, viewable in TensorBoard / Perfetto) and prints where their time went by kind
of HLO instruction (bench/profile_summary.py; also in the JSON under "profile").
--variants=default,no_groupnorm_barrier,... instead times variants of our own step (see
VARIANTS: switches of the code, e.g. XLA's own filter gradient on the CPU) in one
process, in --rounds alternating rounds, and prints each one's step time and its ratio to
the first: an A/B that the machine's drift cannot fake.
The last line printed is one JSON object with every figure (also --json_out=FILE).
"""
import contextlib
import importlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from imagen_jax import host_malloc  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/bench_cpu.py", "Cascade config.")
flags.DEFINE_string("stage", "base", "Stage to measure.")
flags.DEFINE_integer("batch", 0, "Global batch (0: the stage's train.batch_size).")
flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_list("text", ["precomputed", "encoder"], "Text modes: precomputed, encoder.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: the table / measured).")
flags.DEFINE_bool("peer", False, "Also run imagen-pytorch on the same step.")
flags.DEFINE_string("peer_python", "", "Python of an existing peer environment.")
flags.DEFINE_string("peer_venv", "", "Where to make the peer's venv (default ~/.cache/...).")
flags.DEFINE_string("peer_wheels", "", "Install the peer offline from these wheels.")
flags.DEFINE_bool("peer_system_site_packages", False, "Peer venv sees the system's torch.")
flags.DEFINE_integer("peer_threads", 0, "torch threads for a CPU peer (0: the core count).")
flags.DEFINE_integer("rounds", 0, "With --peer: time the precomputed mode and the peer in this "
                     "many interleaved rounds of --steps each (both processes alive at once), "
                     "so that a machine's drifting speed falls on both; 0: the peer runs "
                     "first, alone, then ours.")
flags.DEFINE_string("json_out", "", "Also write the JSON result here.")
flags.DEFINE_string("profile_dir", "", "Also trace --profile_steps steps of each text mode "
                    "with jax.profiler into DIR/<mode> and print where their time goes "
                    "(bench/profile_summary.py).")
flags.DEFINE_integer("profile_steps", 2, "Steps traced with --profile_dir.")
flags.DEFINE_list("variants", [], "Time these VARIANTS of our step against one another in "
                  "one process (--rounds alternating rounds, precomputed text) instead.")
FLAGS = flags.FLAGS

# Variants of our step for --variants: (module, attribute, value) set while it is traced.
VARIANTS = {
    "default": (),
    # No optimization barrier on GroupNorm input gradients (layers.materialize_grad).
    "no_groupnorm_barrier": (("imagen_jax.models.layers", "GROUPNORM_GRAD_BARRIER", False),),
    # XLA's own filter gradient for every conv on the CPU too (models/conv_cpu.py).
    "xla_filter_gradient": (("imagen_jax.models.conv_cpu", "MAX_PIXELS", 0),),
}


@contextlib.contextmanager
def switched(settings):
  """Sets each (module, attribute, value) of a VARIANTS entry; puts them back after."""
  saved = []
  try:
    for module_name, attribute, value in settings:
      module = importlib.import_module(module_name)
      saved.append((module, attribute, getattr(module, attribute)))
      setattr(module, attribute, value)
    yield
  finally:
    for module, attribute, value in reversed(saved):
      setattr(module, attribute, value)


def time_steps(compiled, state, batch, text_params, steps: int):
  """Runs `steps` steps; returns (their times, the last metrics, the new state)."""
  import jax
  times, metrics = [], None
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, text_params)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return times, metrics, state


def profile_steps(compiled, state, batch, text_params, mode: str, log) -> dict:
  """Traces --profile_steps more steps into --profile_dir/<mode>; returns the summary of
  where their time went (bench/profile_summary.py), which is also logged."""
  import jax

  from bench import profile_summary
  trace_dir = os.path.join(FLAGS.profile_dir, mode)
  jax.profiler.start_trace(trace_dir)
  try:
    for _ in range(FLAGS.profile_steps):
      state, metrics = compiled(state, batch, text_params)
      jax.block_until_ready(metrics)
  finally:
    jax.profiler.stop_trace()
  hlo = compiled.as_text()
  with open(os.path.join(trace_dir, "train_step.hlo.txt"), "w") as f:
    f.write(hlo)
  summary = profile_summary.summarize(trace_dir, hlo, steps=FLAGS.profile_steps,
                                      num_devices=jax.device_count())
  log(f"{mode}: profile in {trace_dir}\n" + profile_summary.format_summary(summary))
  return summary


def build_step(config, spec, mode: str, batch_size: int, switches=()):
  """Our step for one text mode, compiled (with a VARIANTS entry's `switches` set while
  it is traced), its train state and a random batch: (compiled, state, batch,
  text_params, init_s, compile_s)."""
  import flax.linen as nn
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from imagen_jax.models import UNet
  from imagen_jax.parallel import mesh as mesh_lib
  from imagen_jax.text import T5Encoder, init_params
  from imagen_jax.train import stages as stages_lib
  from imagen_jax.train.loop import example_inputs
  from imagen_jax.train.state import create_train_state, make_optimizer
  from imagen_jax.train.step import make_train_step

  mesh = mesh_lib.make_mesh(dict(config.mesh))
  rules = mesh_lib.rules_from_config(config.axis_rules)
  t5 = stages_lib.t5_config(config)
  L, r = config.text.max_length, spec.resolution
  optimizer = make_optimizer(spec.optimizer)
  unet = UNet(spec.unet)
  t0 = time.perf_counter()
  state, shardings = create_train_state(unet, example_inputs(spec, t5.d_model, L), optimizer,
                                        rng=jax.random.key(0), mesh=mesh, rules=rules)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  step_fn = make_train_step(unet, T5Encoder(t5), spec.diffusion, optimizer,
                            ema_decay=spec.optimizer.ema_decay,
                            lowres_resolution=spec.lowres_resolution,
                            train_crop=spec.train_crop)
  rng = np.random.default_rng(0)
  lengths = rng.integers(L // 2, L + 1, batch_size)
  mask = np.arange(L)[None] < lengths[:, None]
  batch = {"image": rng.integers(0, 256, (batch_size, r, r, 3), dtype=np.uint8)}
  if mode == "encoder":
    batch["text_tokens"] = np.where(mask, rng.integers(2, t5.vocab_size, (batch_size, L)),
                                    0).astype(np.int32)
    text_params = jax.device_put(init_params(t5, 0), NamedSharding(mesh, P()))
  else:
    emb = rng.standard_normal((batch_size, L, t5.d_model)).astype(np.float32) * mask[..., None]
    batch["text_embedding"] = emb.astype(jax.numpy.bfloat16)  # how precompute stores them
    batch["text_mask"] = mask
    text_params = None
  batch = mesh_lib.host_to_global(batch, mesh, rules)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), switched(switches):
    compiled = jax.jit(step_fn, in_shardings=(shardings, mesh_lib.batch_sharding(mesh, rules),
                                               None if text_params is None else
                                               NamedSharding(mesh, P())),
                       out_shardings=(shardings, None), donate_argnums=(0,)).lower(
                           state, batch, text_params).compile()
  compile_s = time.perf_counter() - t0
  return compiled, state, batch, text_params, init_s, compile_s


def run_ours(config, spec, mode: str, batch_size: int, log, peer=None) -> dict:
  """One text mode of our step: builds the state, compiles, times. Returns figures.

  With `peer` (a peer_env.InterleavedPeer) the timed steps come in its rounds, our
  --steps and then its, alternating which goes first (so a drift within a round falls
  on both); the run then also holds the peer's times and the ratio of each round."""
  import jax
  import numpy as np
  compiled, state, batch, text_params, init_s, compile_s = build_step(
      config, spec, mode, batch_size)
  log(f"{mode}: init {init_s:.1f} s, compile {compile_s:.1f} s; timing {FLAGS.steps} steps")
  _, metrics, state = time_steps(compiled, state, batch, text_params, FLAGS.warmup)
  times, round_ratios, peer_times = [], [], []
  for i in range(peer.rounds if peer else 1):
    if peer and i % 2:
      peer_round = peer.round()
    round_times, metrics, state = time_steps(compiled, state, batch, text_params, FLAGS.steps)
    if peer:
      if not i % 2:
        peer_round = peer.round()
      peer_times += peer_round
      round_ratios.append(statistics.median(peer_round) / statistics.median(round_times))
      log(f"{mode}: round {i + 1}: ours {statistics.median(round_times):.3f} s, "
          f"peer {statistics.median(peer_round):.3f} s per step")
    times += round_times
  step_s = statistics.median(times)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{mode}: the loss is {loss}; the figures would be meaningless")
  run = dict(text=mode, compile_s=compile_s, init_s=init_s, step_s=step_s,
             step_s_min=min(times), step_s_max=max(times), loss=loss,
             img_per_s=batch_size / step_s,
             img_per_s_per_device=batch_size / step_s / jax.device_count())
  if peer:
    run.update(times=times, peer_times=peer_times, round_ratios=round_ratios)
  if FLAGS.profile_dir:
    run["profile"] = profile_steps(compiled, state, batch, text_params, mode, log)
  return run


def run_variants(config, spec, batch_size: int, log) -> dict:
  """--variants: each VARIANTS entry's step compiled in this process (same init, same
  batch, precomputed text), then timed in --rounds rounds of --steps each, the order
  reversed every other round. Returns {name: figures}, with each step time's ratio to the
  first variant's and a count of the compiled program's convolutions and fusions (to
  show that a variant changed the program)."""
  import numpy as np
  names = FLAGS.variants
  built = {}
  for name in names:
    compiled, state, batch, _, _, compile_s = build_step(
        config, spec, "precomputed", batch_size, VARIANTS[name])
    hlo = compiled.as_text()
    _, _, state = time_steps(compiled, state, batch, None, FLAGS.warmup)
    built[name] = dict(compiled=compiled, state=state, batch=batch, times=[], figures=dict(
        compile_s=compile_s, hlo_convolutions=hlo.count(" convolution("),
        hlo_fusions=hlo.count(" fusion(")))
    log(f"variant {name}: compile {compile_s:.1f} s")
  for i in range(max(FLAGS.rounds, 1)):
    for name in (names if i % 2 == 0 else names[::-1]):
      b = built[name]
      times, metrics, b["state"] = time_steps(b["compiled"], b["state"], b["batch"], None,
                                              FLAGS.steps)
      b["times"] += times
      b["figures"]["loss"] = float(metrics["loss"])
    log(f"round {i + 1}: " + ", ".join(
        f"{n} {statistics.median(built[n]['times'][-FLAGS.steps:]):.4f} s" for n in names))
  first = statistics.median(built[names[0]]["times"])
  result = {}
  for name in names:
    b = built[name]
    if not np.isfinite(b["figures"]["loss"]):
      raise FloatingPointError(f"variant {name}: the loss is {b['figures']['loss']}")
    step_s = statistics.median(b["times"])
    result[name] = dict(b["figures"], step_s=step_s, times=b["times"],
                        img_per_s=batch_size / step_s, step_ratio=step_s / first)
  return result


def peer_spec(config, spec, batch_size: int, device) -> dict:
  import dataclasses
  return dict(
      mode="train", unet=dataclasses.asdict(spec.unet), resolution=spec.resolution,
      lowres_resolution=spec.lowres_resolution, batch=batch_size,
      text_len=config.text.max_length, steps=FLAGS.steps, warmup=FLAGS.warmup,
      dtype=spec.unet.dtype, prediction=spec.diffusion.prediction,
      schedule=spec.diffusion.schedule, cond_drop_prob=spec.diffusion.cond_drop_prob,
      lr=spec.optimizer.learning_rate, b1=spec.optimizer.b1, b2=spec.optimizer.b2,
      eps=spec.optimizer.eps, grad_clip=spec.optimizer.grad_clip_norm,
      ema_decay=spec.optimizer.ema_decay,
      device="cuda" if device.platform == "gpu" else "cpu",
      threads=(FLAGS.peer_threads or os.cpu_count()) if device.platform == "cpu" else 0)


def peer_result(peer: dict, peak: float, n: int, device) -> dict:
  """The peer's own figures plus img/s, TFLOP/s and MFU on our terms."""
  from imagen_jax import perf
  peer["img_per_s"] = peer.pop("items_per_s")
  peer["tflops_per_device"] = peer["train_flops_per_image"] * peer["img_per_s"] / 1e12
  # The peer is one process on the whole host: on a CPU split into devices, its peak is
  # all of theirs.
  host_peak = peak * (n if device.platform == "cpu" else 1)
  peer["mfu"] = perf.mfu(peer["train_flops_per_image"], peer["img_per_s"], host_peak)
  if "peak_memory_bytes" in peer:
    peer["peak_memory_gib"] = peer.pop("peak_memory_bytes") / 2**30
  print(f"[train_step] peer result: {json.dumps(peer, default=float)}", file=sys.stderr,
        flush=True)
  return peer


def main(argv):
  del argv
  if FLAGS.peer:  # JAX would otherwise take 75% of a GPU's memory before the peer runs
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  from imagen_jax import perf, summarize
  from imagen_jax.parallel import mesh as mesh_lib
  from imagen_jax.train import stages as stages_lib

  log = lambda msg: print(f"[train_step] {msg}", file=sys.stderr, flush=True)  # noqa: E731
  config = FLAGS.config
  if FLAGS.batch:
    config.stages[FLAGS.stage].train.batch_size = FLAGS.batch
  from imagen_jax.parallel import cpu_devices
  cpu_devices.apply(config)  # as `python -m imagen_jax.train` does, before devices exist
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  specs = {s.name: s for s in stages_lib.validate(config, mesh)}
  if FLAGS.stage not in specs:
    raise app.UsageError(f"--stage={FLAGS.stage}: the config has stages {sorted(specs)}")
  spec = specs[FLAGS.stage]
  if spec.optimizer.name != "adam" and FLAGS.peer:
    raise app.UsageError(
        f"--peer compares like with like: the stage's optimizer is {spec.optimizer.name!r} "
        f"and the peer runs torch Adam; add --config.stages.{spec.name}.optimizer.name=adam")
  batch_size = spec.train.batch_size
  device = jax.devices()[0]
  n = jax.device_count()
  dtype = spec.unet.dtype
  flops = summarize.train_flops_per_image(config, spec.name)
  peak, peak_source = perf.peak_for(device, dtype, FLAGS.peak_tflops, log)
  result = dict(
      stage=spec.name, resolution=spec.resolution, train_size=summarize.train_size(spec),
      batch=batch_size, dtype=dtype, optimizer=spec.optimizer.name,
      text_len=config.text.max_length, text_dim=stages_lib.t5_config(config).d_model,
      device=device.device_kind, platform=device.platform, num_devices=n,
      mesh=dict(mesh.shape), jax=jax.__version__,
      host_malloc=host_malloc.preloaded_allocator(),
      params_m=sum(x.size for x in jax.tree.leaves(summarize.abstract_params(spec))) / 1e6,
      train_gflops_per_image=flops / 1e9, peak_tflops_per_device=peak, peak_source=peak_source,
      runs=[])
  if FLAGS.variants:
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown or FLAGS.peer:
      raise app.UsageError(f"--variants takes {sorted(VARIANTS)}, without --peer; got "
                           f"{FLAGS.variants}{' and --peer' if FLAGS.peer else ''}")
    result["variants"] = run_variants(config, spec, batch_size, log)
    print(f"\n{spec.name}, batch {batch_size}, {max(FLAGS.rounds, 1)} alternating rounds of "
          f"{FLAGS.steps} steps; step s (median) and its ratio to {FLAGS.variants[0]}:")
    for name, v in result["variants"].items():
      print(f"  {name:<24}{v['step_s']:>9.4f} s {v['step_ratio']:>7.3f}  "
            f"(compile {v['compile_s']:.1f} s, loss {v['loss']:.6f})")
    emit_json(result)
    return
  # The peer runs first, while this process holds no device memory yet (see main), or,
  # with --rounds, beside ours in interleaved rounds.
  interleaved = None
  if FLAGS.peer:
    from bench import peer_env
    python = FLAGS.peer_python or peer_env.make_peer_python(
        FLAGS.peer_venv or peer_env.DEFAULT_VENV, wheels=FLAGS.peer_wheels,
        system_site_packages=FLAGS.peer_system_site_packages, log=log)
    log(f"peer: imagen-pytorch in {python}")
    try:
      spec_json = peer_spec(config, spec, batch_size, device)
      if FLAGS.rounds:
        if "precomputed" not in FLAGS.text:
          raise app.UsageError("--rounds interleaves the peer with --text=precomputed")
        interleaved = peer_env.InterleavedPeer(python, {**spec_json, "rounds": FLAGS.rounds})
      else:
        result["peer"] = peer_result(peer_env.run_peer(python, spec_json), peak, n, device)
    except app.UsageError:
      raise
    except Exception as e:  # noqa: BLE001
      log(f"peer FAILED: {str(e)[:3000]}")
      result["peer"] = dict(error=str(e)[:1000])
  for mode in FLAGS.text:
    peer = interleaved if mode == "precomputed" else None
    try:
      run = run_ours(config, spec, mode, batch_size, log, peer=peer)
      if peer:
        result["peer"] = peer_result(peer.result, peak, n, device)
    except Exception as e:  # noqa: BLE001  an OOM in one mode must not lose the other
      if peer:
        result["peer"] = dict(error=f"interleaved with ours: {str(e)[:1000]}")
      log(f"{mode}: FAILED: {type(e).__name__}: {str(e)[:500]}")
      result["runs"].append(dict(text=mode, error=f"{type(e).__name__}: {str(e)[:300]}"))
      continue
    run["tflops_per_device"] = flops * run["img_per_s_per_device"] / 1e12
    run["mfu"] = perf.mfu(flops, run["img_per_s_per_device"], peak)
    mem, what = perf.peak_memory(device)
    run.update(peak_memory_gib=mem / 2**30, peak_memory_kind=what)
    result["runs"].append(run)
  if interleaved:
    interleaved.close()
  ours = next((r for r in result["runs"] if r.get("text") == "precomputed"
               and "error" not in r), None)
  if ours and "img_per_s" in result.get("peer", {}):
    result["ratio_img_per_s"] = ours["img_per_s"] / result["peer"]["img_per_s"]
  print_table(result)
  emit_json(result)


def emit_json(result: dict) -> None:
  """The last line printed: every figure as one JSON object (also to --json_out)."""
  line = json.dumps(result, default=float)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      f.write(line + "\n")
  print(line)


def print_table(result):
  print(f"\n{result['stage']} {result['train_size']}x{result['train_size']} batch "
        f"{result['batch']} {result['dtype']} on {result['num_devices']} x {result['device']}"
        f" | {result['params_m']:.1f}M params, {result['train_gflops_per_image']:.2f} "
        f"GFLOP/image (train) | peak {result['peak_tflops_per_device']:.1f} TFLOP/s/device "
        f"({result['peak_source']})")
  print(f"host malloc: {result['host_malloc']} (imagen_jax/host_malloc.py; the peer inherits "
        "it)")
  print(f"{'run':<26}{'compile s':>10}{'step s':>9}{'img/s':>9}{'img/s/dev':>10}"
        f"{'TFLOP/s/dev':>12}{'MFU':>7}{'peak mem GiB':>13}")
  rows = [(f"imagen-jax, {r['text']}", r) for r in result["runs"]]
  if "peer" in result:
    rows.append(("imagen-pytorch, precomputed", result["peer"]))
  for name, r in rows:
    if "error" in r:
      print(f"{name:<26}  {r['error'][:90]}")
      continue
    per_dev = r.get("img_per_s_per_device", r["img_per_s"])
    mem = r.get("peak_memory_gib")
    print(f"{name:<26}{r.get('compile_s', float('nan')):>10.1f}{r['step_s']:>9.4f}"
          f"{r['img_per_s']:>9.1f}{per_dev:>10.1f}{r['tflops_per_device']:>12.2f}"
          f"{100 * r['mfu']:>6.1f}%{'' if mem is None else f'{mem:>13.2f}'}")
  if "ratio_img_per_s" in result:
    p = result["peer"]
    print(f"imagen-jax / imagen-pytorch img/s: {result['ratio_img_per_s']:.2f}x "
          f"(their U-Net: {p['params_m']:.1f}M params, "
          f"{p['train_flops_per_image'] / 1e9:.2f} GFLOP/image; torch {p['torch']}, "
          f"{p['threads']} threads)")
  ratios = next((r["round_ratios"] for r in result["runs"] if "round_ratios" in r), None)
  if ratios:
    print(f"per interleaved round ({len(ratios)} rounds): "
          + " ".join(f"{x:.2f}x" for x in ratios)
          + f"; ours ahead in {sum(x > 1 for x in ratios)} of {len(ratios)}")


if __name__ == "__main__":
  host_malloc.reexec()  # tcmalloc when the machine has it: see imagen_jax/host_malloc.py
  app.run(main)
