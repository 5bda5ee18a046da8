r"""Sampling latency and images/s of one stage and of the whole cascade, per sampler and
step count, with classifier-free guidance on, optionally beside imagen-pytorch.

For every stage x sampler x step count this times the stage's compiled sampling loop
(`imagen_jax.sample.stage_sampler.make_stage_sampler`, what `Cascade.generate` runs: the
whole reverse process, guidance and thresholding in one jitted call) on `--batch` random
text embeddings of the config's width and length (and, for a super-resolution stage,
random low-res images in [-1, 1]):
  compile s     lowering + XLA compilation of the call;
  latency s     median of --repeats calls (after --warmup untimed ones);
  img/s         batch / latency;
  U-Net calls   denoiser calls per sampling call (diffusion.CALLS: steps, 2 steps - 2 for
                heun), each on a batch of 2B with guidance (cond and uncond in one pass),
                so 2 x calls forward passes per image;
  TFLOP/s, MFU  model FLOPs = `summarize.sample_flops_per_image` (one U-Net forward of one
                image) x forward passes per image; MFU against `imagen_jax.perf.peak_for`
                (the datasheet table, --peak_tflops, or on a CPU the measured matmul rate,
                labelled so); the sampler's own elementwise arithmetic is not counted;
  peak memory   `imagen_jax.perf.peak_memory` (device allocator peak; on a CPU the
                process's peak RSS, which only grows over the runs).
The whole cascade is the sum over the stages of one call each at the same sampler and
steps: the latency of `batch` final images from text embeddings. The frozen T5 encoding of
`batch` captions (token ids in, padded features out; the tokenizer not included) is timed
on its own and added as a second figure.

Weights: --workdir loads the trained cascade (`Cascade.from_workdir`: EMA params and the
run's text encoder); otherwise every stage and the encoder get seeded random weights,
which time the same as trained ones (the output says which).

--peer runs imagen-pytorch 2.1.0's own sampling of each stage (bench/peers/
imagen_pytorch_peer.py "sample" mode, in the peer's environment, bench/peer_env.py)
first, before JAX touches the device, with the same U-Net hyperparameters, batch,
guidance and step count. Its sampler is ancestral DDPM with the step count fixed when
the Imagen is built, and its guidance runs the cond and null passes one after the other:
the samplers differ, the U-Net forward passes per image are the same (2 x steps), so the
ratio is printed against each of our samplers at an equal step count only (and per FLOP,
ratio_tflops, since its U-Nets have no space-to-depth). A CPU peer runs with
OMP_WAIT_POLICY=PASSIVE unless the variable is set (spin-waiting threads made it 10-30x
slower on a shared machine).

  python bench/sample.py --config=configs/shapes.py --stages=base --samplers=dpm++2m \
      --steps=8 --batch=16
  python bench/sample.py --config=configs/shapes.py:tiny --steps=4 --repeats=2 --peer \
      --peer_python=python
The last line printed is one JSON object with every figure (also --json_out=FILE).
"""
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from imagen_jax import host_malloc  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/shapes.py", "Cascade config (ignored "
                                "with --workdir, which has its own).")
flags.DEFINE_string("workdir", "", "Training workdir: time the trained cascade in it.")
flags.DEFINE_list("stages", [], "Stages to time (default: all of config.stage_order).")
flags.DEFINE_list("samplers", ["ddim", "dpm++2m"], "Samplers (diffusion.SAMPLERS).")
flags.DEFINE_list("steps", ["8", "20"], "Sampler step counts.")
flags.DEFINE_integer("batch", 16, "Images per sampling call.")
flags.DEFINE_integer("repeats", 5, "Timed calls per run (median reported).")
flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
flags.DEFINE_float("guidance", None, "Guidance weight of every stage (default: each "
                   "stage's sample.guidance_weight; 1 = no guidance, one pass of B).")
flags.DEFINE_bool("text_encoder", True, "Also time the frozen T5 encoding of the batch.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: the table / measured).")
flags.DEFINE_bool("peer", False, "Also run imagen-pytorch's sampling of each stage.")
flags.DEFINE_string("peer_python", "", "Python of an existing peer environment.")
flags.DEFINE_string("peer_venv", "", "Where to make the peer's venv (default ~/.cache/...).")
flags.DEFINE_string("peer_wheels", "", "Install the peer offline from these wheels.")
flags.DEFINE_bool("peer_system_site_packages", False, "Peer venv sees the system's torch.")
flags.DEFINE_integer("peer_threads", 0, "torch threads for a CPU peer (0: the core count).")
flags.DEFINE_string("json_out", "", "Also write the JSON result here.")
FLAGS = flags.FLAGS


def log(msg):
  print(f"[sample] {msg}", file=sys.stderr, flush=True)


def guidance_of(spec) -> float:
  return float(spec.sample.guidance_weight if FLAGS.guidance is None else FLAGS.guidance)


def timed_calls(fn, args_for):
  """Runs fn(*args_for(i)) warmup + repeats times; returns (times of the timed ones, the
  last output)."""
  import jax
  times, out = [], None
  for i in range(FLAGS.warmup + FLAGS.repeats):
    args = args_for(i)
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= FLAGS.warmup:
      times.append(time.perf_counter() - t0)
  return times, out


def random_text(config, t5, batch: int, seed: int):
  """Text embeddings [B, L, D] (zero past each caption's random length) and mask [B, L]."""
  import numpy as np
  rng = np.random.default_rng(seed)
  L = config.text.max_length
  lengths = rng.integers(max(1, L // 2), L + 1, batch)
  mask = np.arange(L)[None] < lengths[:, None]
  emb = rng.standard_normal((batch, L, t5.d_model)).astype(np.float32) * mask[..., None]
  return emb, mask


def random_unet_params(spec, t5, config):
  """Seeded random U-Net params (jitted init, compiled for a single run)."""
  import flax.linen as nn
  import jax

  from imagen_jax.models import UNet
  from imagen_jax.train.compile_options import run_rarely_options
  from imagen_jax.train.loop import example_inputs
  model = UNet(spec.unet)
  inputs = example_inputs(spec, t5.d_model, config.text.max_length)
  init = jax.jit(lambda key: nn.unbox(model.init(key, *inputs))["params"])
  key = jax.random.key(0)
  return init.lower(key).compile(compiler_options=run_rarely_options())(key)


def time_text(config, t5, text_params) -> dict:
  """Compile time and median latency of the frozen encoder on `batch` token-id rows."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from imagen_jax.text import T5Encoder
  from imagen_jax.train.step import text_features
  encoder = T5Encoder(t5)
  B, L = FLAGS.batch, config.text.max_length
  rng = np.random.default_rng(1)
  lengths = rng.integers(max(1, L // 2), L + 1, B)
  ids = np.where(np.arange(L)[None] < lengths[:, None], rng.integers(2, t5.vocab_size, (B, L)),
                 0).astype(np.int32)
  ids = jnp.asarray(ids)
  t0 = time.perf_counter()
  compiled = jax.jit(lambda p, i: text_features(encoder, p, i)).lower(text_params, ids).compile()
  compile_s = time.perf_counter() - t0
  times, _ = timed_calls(compiled, lambda i: (text_params, ids))
  latency = statistics.median(times)
  return dict(compile_s=compile_s, latency_s=latency, latency_s_min=min(times),
              latency_s_max=max(times), captions_per_s=B / latency, batch=B, text_len=L,
              d_model=t5.d_model, num_layers=t5.num_layers)


def run_stage(spec, params, config, t5, sampler: str, steps: int, fwd_flops: float,
              peak: float, device) -> dict:
  """One stage x sampler x steps: compile, time, derive the figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from imagen_jax import diffusion, perf
  from imagen_jax.models import UNet
  from imagen_jax.sample.stage_sampler import make_stage_sampler
  g = guidance_of(spec)
  settings = dataclasses.replace(spec.sample, sampler=sampler, steps=steps, guidance_weight=g,
                                 eta=0.0 if sampler != "ddim" else spec.sample.eta)
  run = make_stage_sampler(UNet(spec.unet), settings, schedule=spec.diffusion.schedule,
                           prediction=spec.diffusion.prediction, resolution=spec.resolution,
                           lowres_resolution=spec.lowres_resolution)
  B = FLAGS.batch
  emb, mask = random_text(config, t5, B, seed=2)
  text, text_mask = jnp.asarray(emb), jnp.asarray(mask)
  lowres = None
  if spec.lowres_resolution:
    lr = spec.lowres_resolution
    lowres = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (B, lr, lr, 3)), jnp.float32)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = run.lower(params, key, text, text_mask, lowres).compile()
  compile_s = time.perf_counter() - t0
  log(f"{spec.name} {sampler} {steps} steps: compiled in {compile_s:.1f} s; timing "
      f"{FLAGS.repeats} calls of batch {B}")
  times, out = timed_calls(
      compiled, lambda i: (params, jax.random.key(i), text, text_mask, lowres))
  if not np.all(np.isfinite(np.asarray(out))):
    raise FloatingPointError(f"{spec.name} {sampler}: non-finite samples")
  latency = statistics.median(times)
  calls = diffusion.CALLS[sampler](steps)
  guided = g != 1
  evals = calls * (2 if guided else 1)
  img_per_s = B / latency
  flops_per_image = fwd_flops * evals
  mem, what = perf.peak_memory(device)
  return dict(sampler=sampler, steps=steps, guidance=g, unet_calls=calls,
              unet_batch=B * (2 if guided else 1), unet_evals_per_image=evals,
              compile_s=compile_s, latency_s=latency, latency_s_min=min(times),
              latency_s_max=max(times), img_per_s=img_per_s,
              gflops_per_image=flops_per_image / 1e9,
              tflops=flops_per_image * img_per_s / 1e12,
              mfu=perf.mfu(flops_per_image, img_per_s, peak),
              peak_memory_gib=None if mem is None else mem / 2**30, peak_memory_kind=what)


def peer_spec(config, spec, steps: int, device_platform: str) -> dict:
  return dict(
      mode="sample", unet=dataclasses.asdict(spec.unet), resolution=spec.resolution,
      lowres_resolution=spec.lowres_resolution, batch=FLAGS.batch,
      text_len=config.text.max_length, steps=FLAGS.repeats,
      warmup=0,  # its FLOP-counted first call is an untimed full call already
      dtype=spec.unet.dtype, prediction=spec.diffusion.prediction,
      schedule=spec.diffusion.schedule, cond_drop_prob=spec.diffusion.cond_drop_prob,
      sample_steps=steps, guidance=guidance_of(spec),
      dynamic_thresholding=spec.sample.thresholding == "dynamic",
      lowres_noise_level=spec.sample.lowres_aug_t,
      device="cuda" if device_platform == "gpu" else "cpu",
      threads=(FLAGS.peer_threads or os.cpu_count()) if device_platform == "cpu" else 0)


def run_peers(config, specs, steps_list, platform) -> list:
  from bench import peer_env
  python = FLAGS.peer_python or peer_env.make_peer_python(
      FLAGS.peer_venv or peer_env.DEFAULT_VENV, wheels=FLAGS.peer_wheels,
      system_site_packages=FLAGS.peer_system_site_packages, log=log)
  # On a CPU, torch's OpenMP threads spin-wait for cores that other processes hold, which
  # made the peer 10-30x slower on the shared 2-core machine (bench/README.md, encode.py);
  # passive waiting is the fair setting there. An OMP_WAIT_POLICY already set is kept.
  env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} \
      if platform == "cpu" else {}
  log(f"peer: imagen-pytorch in {python}" + (f", {env}" if env else ""))
  peers = []
  for spec in specs:
    for steps in steps_list:
      entry = dict(stage=spec.name, steps=steps)
      try:
        log(f"peer: {spec.name}, DDPM {steps} steps, batch {FLAGS.batch}")
        p = peer_env.run_peer(python, peer_spec(config, spec, steps, platform), env=env)
        p.update(env)
        p["img_per_s"] = p.pop("items_per_s")
        p["latency_s"] = p.pop("step_s")
        if "peak_memory_bytes" in p:
          p["peak_memory_gib"] = p.pop("peak_memory_bytes") / 2**30
        entry.update(p)
        log(f"peer: {spec.name} {steps} steps: {p['latency_s']:.3f} s/call, "
            f"{p['img_per_s']:.1f} img/s")
      except Exception as e:  # noqa: BLE001  one failing stage must not lose the rest
        log(f"peer {spec.name} {steps} steps FAILED: {str(e)[:3000]}")
        entry["error"] = str(e)[:1000]
      peers.append(entry)
  return peers


def main(argv):
  del argv
  if FLAGS.peer:  # JAX would otherwise take 75% of a GPU's memory before the peer runs
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  from imagen_jax import diffusion, perf, summarize
  from imagen_jax.train import stages as stages_lib

  try:
    steps_list = [int(s) for s in FLAGS.steps]
  except ValueError:
    raise app.UsageError(f"--steps={','.join(FLAGS.steps)}: give integers, e.g. 8,20") from None
  for s in FLAGS.samplers:
    if s not in diffusion.SAMPLERS:
      raise app.UsageError(f"--samplers: {s!r} is not one of {diffusion.SAMPLERS}")
  if FLAGS.workdir:
    from imagen_jax.sample.cascade import load_config
    config = load_config(FLAGS.workdir)  # no device memory yet: the peer runs first
  else:
    config = FLAGS.config
  names = list(FLAGS.stages or config.stage_order)
  for name in names:
    if name not in config.stages:
      raise app.UsageError(f"--stages: {name!r}; the config has {list(config.stage_order)}")
  specs = [stages_lib.stage_spec(config, name) for name in names]
  t5 = stages_lib.t5_config(config)
  device = jax.devices()[0]
  result = dict(
      config=(os.path.join(FLAGS.workdir, "config.json") if FLAGS.workdir else
              config_flags.get_config_filename(FLAGS["config"])),
      weights=("trained (EMA) from " + FLAGS.workdir) if FLAGS.workdir else
      "random init (seeded; timing only: trained weights run the same computation)",
      batch=FLAGS.batch, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
      device=device.device_kind, platform=device.platform, jax=jax.__version__,
      host_malloc=host_malloc.preloaded_allocator(),
      text_len=config.text.max_length, text_dim=t5.d_model, stages=[], cascade=[])

  # The peer runs first, while this process holds no device memory yet (see above).
  peers = run_peers(config, specs, steps_list, device.platform) if FLAGS.peer else []
  if FLAGS.peer:
    result["peer"] = peers
    result["peer_note"] = ("imagen-pytorch 2.1.0 samples with its own ancestral DDPM "
                           "(timesteps = steps) and runs guidance as two passes of B; ours "
                           "with the named sampler and one pass of 2B. Same U-Net forward "
                           "passes per image (2 x steps); samplers differ.")
    folded = [f"{s.name} (space_to_depth {s.unet.space_to_depth})" for s in specs
              if s.unet.space_to_depth > 1]
    if folded:
      result["peer_note"] += (
          " imagen-pytorch has no space-to-depth, so its U-Net of " + ", ".join(folded) +
          " runs at the full resolution: more FLOPs per image (sample_flops_per_image); "
          "ratio_tflops compares per FLOP.")

  if FLAGS.workdir:
    from imagen_jax.sample.cascade import Cascade
    t0 = time.perf_counter()
    cascade = Cascade.from_workdir(FLAGS.workdir, names)
    log(f"loaded the cascade from {FLAGS.workdir} in {time.perf_counter() - t0:.1f} s "
        f"(checkpoint steps {cascade.steps})")
    stage_params, text_params = cascade.stage_params, cascade.text_params
    specs = cascade.specs
  else:
    stage_params, text_params = {}, None

  dtypes = {s.unet.dtype for s in specs}
  peak_dtype = "bfloat16" if "bfloat16" in dtypes else "float32"
  peak, peak_source = perf.peak_for(device, peak_dtype, FLAGS.peak_tflops, log)
  result.update(peak_tflops=peak, peak_source=peak_source, peak_dtype=peak_dtype)
  for p in peers:
    if "sample_flops_per_image" in p:
      p["tflops"] = p["sample_flops_per_image"] * p["img_per_s"] / 1e12
      p["mfu"] = perf.mfu(p["sample_flops_per_image"], p["img_per_s"], peak)

  if FLAGS.text_encoder:
    try:
      if text_params is None:
        from imagen_jax.text import init_params
        text_params = init_params(t5, int(config.text.get("init_seed", 0)))
      result["text"] = time_text(config, t5, text_params)
      log(f"text encoder: {result['text']['latency_s'] * 1e3:.1f} ms per batch of "
          f"{FLAGS.batch}")
    except Exception as e:  # noqa: BLE001
      log(f"text encoder FAILED: {type(e).__name__}: {str(e)[:500]}")
      result["text"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    text_params = None  # free it before the U-Nets

  for spec in specs:
    fwd = summarize.sample_flops_per_image(config, spec.name)
    entry = dict(stage=spec.name, resolution=spec.resolution,
                 lowres_resolution=spec.lowres_resolution, dtype=spec.unet.dtype,
                 guidance=guidance_of(spec), unet_gflops_per_forward=fwd / 1e9, runs=[])
    try:
      params = stage_params.get(spec.name)
      if params is None:
        t0 = time.perf_counter()
        params = random_unet_params(spec, t5, config)
        jax.block_until_ready(params)
        entry["init_s"] = time.perf_counter() - t0
      entry["params_m"] = sum(x.size for x in jax.tree.leaves(params)) / 1e6
    except Exception as e:  # noqa: BLE001
      log(f"{spec.name}: init FAILED: {type(e).__name__}: {str(e)[:500]}")
      entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      result["stages"].append(entry)
      continue
    for sampler in FLAGS.samplers:
      for steps in steps_list:
        try:
          run = run_stage(spec, params, config, t5, sampler, steps, fwd, peak, device)
        except Exception as e:  # noqa: BLE001  an OOM in one run must not lose the others
          log(f"{spec.name} {sampler} {steps}: FAILED: {type(e).__name__}: {str(e)[:500]}")
          entry["runs"].append(dict(sampler=sampler, steps=steps,
                                    error=f"{type(e).__name__}: {str(e)[:300]}"))
          continue
        peer = next((p for p in peers if p["stage"] == spec.name and p["steps"] == steps
                     and "error" not in p), None)
        if peer:
          run["peer_latency_s"] = peer["latency_s"]
          run["ratio_img_per_s"] = run["img_per_s"] / peer["img_per_s"]
          if "tflops" in peer:  # per FLOP: apart from the two U-Nets' different sizes
            run["ratio_tflops"] = run["tflops"] / peer["tflops"]
        entry["runs"].append(run)
    stage_params.pop(spec.name, None)
    del params
    result["stages"].append(entry)

  # The whole cascade (the stages timed): one call of each at the same sampler and steps.
  for sampler in FLAGS.samplers:
    for steps in steps_list:
      runs = [next((r for r in s.get("runs", []) if r["sampler"] == sampler
                    and r["steps"] == steps and "error" not in r), None)
              for s in result["stages"]]
      if not runs or None in runs:
        continue
      latency = sum(r["latency_s"] for r in runs)
      c = dict(sampler=sampler, steps=steps, stages=names, latency_s=latency,
               img_per_s=FLAGS.batch / latency,
               unet_evals_per_image=sum(r["unet_evals_per_image"] for r in runs),
               gflops_per_image=sum(r["gflops_per_image"] for r in runs))
      c["tflops"] = c["gflops_per_image"] * c["img_per_s"] / 1e3
      c["mfu"] = perf.mfu(c["gflops_per_image"] * 1e9, c["img_per_s"], peak)
      if "latency_s" in result.get("text", {}):
        c["latency_with_text_s"] = latency + result["text"]["latency_s"]
        c["img_per_s_with_text"] = FLAGS.batch / c["latency_with_text_s"]
      peer_runs = [next((p for p in peers if p["stage"] == n and p["steps"] == steps
                         and "error" not in p), None) for n in names]
      if peers and None not in peer_runs:
        c["peer_latency_s"] = sum(p["latency_s"] for p in peer_runs)
        c["peer_img_per_s"] = FLAGS.batch / c["peer_latency_s"]
        c["ratio_img_per_s"] = c["img_per_s"] / c["peer_img_per_s"]
        if all("sample_flops_per_image" in p for p in peer_runs):
          c["peer_tflops"] = (sum(p["sample_flops_per_image"] for p in peer_runs)
                              * c["peer_img_per_s"] / 1e12)
          c["ratio_tflops"] = c["tflops"] / c["peer_tflops"]
      result["cascade"].append(c)

  print_table(result)
  line = json.dumps(result, default=float)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      f.write(line + "\n")
  print(line)


def print_table(result):
  print(f"\nsampling, batch {result['batch']}, {result['repeats']} timed calls (median), on "
        f"{result['device']} ({result['platform']}); weights: {result['weights']}")
  print(f"peak {result['peak_tflops']:.3f} TFLOP/s ({result['peak_source']}); guidance "
        f"in one U-Net pass of 2B per call; FLOPs = U-Net forwards only")
  text = result.get("text")
  if text and "error" not in text:
    print(f"text encoder (T5, {text['num_layers']} layers, d {text['d_model']}, "
          f"{text['text_len']} tokens): compile {text['compile_s']:.1f} s, "
          f"{text['latency_s'] * 1e3:.1f} ms per batch, {text['captions_per_s']:.1f} captions/s")
  elif text:
    print(f"text encoder: {text['error'][:100]}")
  head = (f"{'stage':<7}{'sampler':<9}{'steps':>6}{'calls x B':>11}{'compile s':>10}"
          f"{'latency s':>10}{'img/s':>9}{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>8}"
          f"{'mem GiB':>8}" + (f"{'peer s':>9}{'ours/peer':>10}" if "peer" in result else ""))
  print(head)
  for s in result["stages"]:
    if "error" in s:
      print(f"{s['stage']:<7}{s['error'][:100]}")
      continue
    for r in s["runs"]:
      if "error" in r:
        print(f"{s['stage']:<7}{r['sampler']:<9}{r['steps']:>6}  {r['error'][:90]}")
        continue
      mem = r.get("peak_memory_gib")
      print(f"{s['stage']:<7}{r['sampler']:<9}{r['steps']:>6}"
            f"{str(r['unet_calls']) + ' x ' + str(r['unet_batch']):>11}{r['compile_s']:>10.1f}"
            f"{r['latency_s']:>10.3f}{r['img_per_s']:>9.1f}{r['gflops_per_image']:>10.2f}"
            f"{r['tflops']:>9.4f}{100 * r['mfu']:>7.2f}%"
            f"{'' if mem is None else f'{mem:>8.2f}':>8}" +
            (f"{r['peer_latency_s']:>9.3f}{r['ratio_img_per_s']:>9.2f}x"
             if "peer_latency_s" in r else ""))
  for p in result.get("peer", []):
    if "error" in p:
      print(f"peer {p['stage']} {p['steps']} steps: {p['error'][:100]}")
      continue
    print(f"peer {p['stage']:<5} DDPM {p['steps']:>3} steps: {p['latency_s']:.3f} s, "
          f"{p['img_per_s']:.1f} img/s, {p['sample_flops_per_image'] / 1e9:.2f} GFLOP/img, "
          f"{p['tflops']:.4f} TFLOP/s, MFU {100 * p['mfu']:.2f}% ({p['params_m']:.2f}M params; "
          f"torch {p['torch']}, {p['threads']} threads"
          + (f", OMP_WAIT_POLICY={p['OMP_WAIT_POLICY']}" if "OMP_WAIT_POLICY" in p else "")
          + ")")
  for s in result["stages"]:
    for r in s.get("runs", []):
      if "ratio_tflops" in r:
        print(f"ours/peer per FLOP (TFLOP/s ratio), {s['stage']} {r['sampler']} {r['steps']} "
              f"steps: {r['ratio_tflops']:.2f}x")
  if result["cascade"]:
    print(f"whole cascade ({' -> '.join(result['cascade'][0]['stages'])}), batch "
          f"{result['batch']}, one call per stage:")
    for c in result["cascade"]:
      with_text = (f", {c['latency_with_text_s']:.3f} s with T5 ({c['img_per_s_with_text']:.1f}"
                   f" img/s)") if "latency_with_text_s" in c else ""
      peer = (f"; imagen-pytorch {c['peer_latency_s']:.3f} s, ours/peer "
              f"{c['ratio_img_per_s']:.2f}x img/s" +
              (f", {c['ratio_tflops']:.2f}x per FLOP" if "ratio_tflops" in c else "")
              ) if "ratio_img_per_s" in c else ""
      print(f"  {c['sampler']:<8}{c['steps']:>3} steps: {c['latency_s']:.3f} s "
            f"({c['img_per_s']:.1f} img/s, MFU {100 * c['mfu']:.2f}%){with_text}{peer}")
  if result.get("peer"):
    print(f"note: {result['peer_note']}")


if __name__ == "__main__":
  host_malloc.reexec()  # tcmalloc when the machine has it: see imagen_jax/host_malloc.py
  app.run(main)
