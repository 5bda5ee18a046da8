"""The benchmark machinery: the peak table, MFU arithmetic, the cuDNN key padding, and
the imagen-pytorch peer (run for one step in this Python, which has it for parity tests).
No timing is asserted anywhere."""
import dataclasses
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import perf, summarize
from imagen_jax.config_files import load_sibling
from imagen_jax.models import layers
from imagen_jax.train import stages as stages_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_peer = pytest.mark.skipif(
    importlib.util.find_spec("imagen_pytorch") is None or importlib.util.find_spec("torch") is None,
    reason="imagen-pytorch is not installed (README's test command installs it)")


@pytest.mark.parametrize("kind, bf16, f32", [
    ("NVIDIA H100 80GB HBM3", 989, 495),
    ("NVIDIA H100 PCIe", 756, 378),
    ("NVIDIA H200", 989, 495),
    ("NVIDIA A100-SXM4-80GB", 312, 156),
    ("TPU v4", 275, 275),
    ("TPU v5 lite", 197, 197),
    ("TPU v5e", 197, 197),
    ("TPU v5p", 459, 459),
    ("TPU v6 lite", 918, 918),
])
def test_peak_table_matches_device_kinds(kind, bf16, f32):
  assert perf.peak_tflops(kind, "bfloat16") == bf16
  assert perf.peak_tflops(kind, "float32") == f32
  assert perf.find_peak(kind).source


def test_unknown_devices_have_no_peak_and_mfu_is_plain_arithmetic():
  assert perf.find_peak("cpu") is None and perf.peak_tflops("cpu", "float32") is None
  # 4 TFLOP per image at 100 images/s on a 989 TFLOP/s chip.
  assert perf.mfu(4e12, 100.0, 989.0) == pytest.approx(400 / 989)
  nbytes, what = perf.peak_memory()
  assert nbytes > 0 and what


def test_a_cpu_peak_is_shared_by_its_simulated_devices(monkeypatch):
  monkeypatch.setattr(perf, "measured_matmul_tflops", lambda dtype: 0.8)
  peak, source = perf.peak_for(jax.devices("cpu")[0], "float32")
  assert peak == pytest.approx(0.8 / 8)  # this process simulates 8 CPU devices
  assert "measured" in source and "divided among its 8 CPU devices" in source


def test_padded_keys_leave_attention_unchanged():
  """cuDNN's flash attention takes keys in multiples of 64; the padding must be masked out
  exactly (checked on the einsum and XLA paths, which run here)."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((2, 16, 2, 8), (2, 9, 2, 8), (2, 9, 2, 8)))
  for mask in (None, jnp.arange(9)[None] < jnp.array([[5], [9]])):
    kp, vp, mp = layers.pad_keys(k, v, mask, multiple=64)
    assert kp.shape[1] == 64 and mp.shape == (2, 64) and not bool(mp[:, 9:].any())
    ref = layers.attention(q, k, v, mask)
    for impl in ("einsum", "xla"):
      np.testing.assert_allclose(layers.attention(q, kp, vp, mp, impl), ref, atol=1e-6)
  assert layers.pad_keys(k[:, :8], v[:, :8], None, multiple=8)[2] is None  # no-op


def test_model_flops_ignore_remat_and_attention_kernel():
  config = load_sibling(os.path.join(ROOT, "configs", "x.py"), "shapes").get_config("tiny")
  base = summarize.train_flops_per_image(config, "base")
  for field, value in (("remat", "full"), ("attention_impl", "xla")):
    config.stages.base.unet[field] = value
    assert summarize.train_flops_per_image(config, "base") == base, field
  # forward + backward ~ 3x forward for a conv net (backward: input and weight gradients)
  forward = summarize.sample_flops_per_image(config, "base")
  assert 2.5 * forward < base < 3.5 * forward


@needs_peer
def test_peer_trains_the_same_hyperparameters_in_imagen_pytorch():
  """The peer maps our U-Net config onto imagen-pytorch's Unet and runs its training step
  (Adam, clipping, EMA) in a subprocess; here in this Python, for one timed step."""
  sys.path.insert(0, ROOT)
  from bench import peer_env  # (not bench.train_step: its absl flags are process-global)
  config = load_sibling(os.path.join(ROOT, "configs", "x.py"), "bench_cpu").get_config()
  spec = stages_lib.stage_spec(config, "base")
  unet = spec.unet  # the CPU target (16.8M params), at 16x16 to keep it short
  peer = peer_env.run_peer(sys.executable, dict(
      mode="train", unet=dataclasses.asdict(unet), resolution=16, lowres_resolution=0,
      batch=2, text_len=config.text.max_length, steps=1, warmup=0, dtype="float32",
      prediction="v", schedule="cosine", cond_drop_prob=0.1, lr=1e-4, b1=0.9, b2=0.99,
      eps=1e-8, grad_clip=1.0, ema_decay=0.999, device="cpu", threads=1))
  ours = sum(x.size for x in jax.tree.leaves(
      summarize.abstract_params(dataclasses.replace(spec, unet=unet)))) / 1e6
  # Same knobs, slightly different structure (bench/peers/imagen_pytorch_peer.py): the
  # sizes agree to within 5% (16.6M vs 16.8M), and the FLOP count is torch's own.
  assert peer["params_m"] == pytest.approx(ours, rel=0.05)
  assert peer["train_flops_per_image"] > 0 and peer["step_s"] > 0


@needs_peer
def test_interleaved_peer_runs_its_rounds_on_demand():
  """--rounds: the peer warms up, then times one round each time it is told "go", so that
  bench/train_step.py can put its own steps between them; after the last it reports."""
  sys.path.insert(0, ROOT)
  from bench import peer_env
  config = load_sibling(os.path.join(ROOT, "configs", "x.py"), "bench_cpu").get_config()
  unet = dataclasses.replace(stages_lib.stage_spec(config, "base").unet, base_channels=16)
  spec = dict(
      mode="train", unet=dataclasses.asdict(unet), resolution=8, lowres_resolution=0,
      batch=2, text_len=config.text.max_length, steps=2, warmup=0, dtype="float32",
      prediction="v", schedule="cosine", cond_drop_prob=0.1, lr=1e-4, b1=0.9, b2=0.99,
      eps=1e-8, grad_clip=1.0, ema_decay=0.999, device="cpu", threads=1, rounds=2)
  with peer_env.InterleavedPeer(sys.executable, spec) as peer:
    first = peer.round()
    assert peer.result is None and peer.rounds == 1  # it waits for the next "go"
    second = peer.round()
  assert len(first) == len(second) == 2 and min(first + second) > 0
  # The result covers every timed step of every round.
  assert peer.result["step_s"] == pytest.approx(float(np.median(first + second)))
  with pytest.raises(ValueError, match="rounds"):
    peer_env.InterleavedPeer(sys.executable, {**spec, "rounds": 0})


@needs_peer
def test_train_step_bench_interleaves_with_the_peer_end_to_end(tmp_path):
  """The command of bench/README.md on the tiny shapes config: both sides timed in
  alternating rounds, one figure per round, the ratio, and the malloc both ran on."""
  import json
  import subprocess
  out = tmp_path / "result.json"
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "bench", "train_step.py"),
       "--config=" + os.path.join(ROOT, "configs", "shapes.py") + ":tiny", "--peer",
       f"--peer_python={sys.executable}", "--peer_threads=1", "--rounds=2", "--steps=1",
       "--warmup=1", "--text=precomputed", f"--json_out={out}"],
      cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
  result = json.loads(out.read_text())
  (run,) = result["runs"]
  assert len(run["round_ratios"]) == 2 and len(run["times"]) == len(run["peer_times"]) == 2
  assert result["peer"]["step_s"] == pytest.approx(float(np.median(run["peer_times"])))
  assert result["ratio_img_per_s"] == pytest.approx(
      run["img_per_s"] / result["peer"]["img_per_s"])
  assert result["host_malloc"]  # "glibc" or the preloaded library's path


def test_profile_summary_puts_a_traced_step_in_its_categories(tmp_path):
  """bench/profile_summary.py on a real trace of a small data-parallel step on 2 devices:
  a 3x3 convolution (forward, and its weight gradient: the input is not differentiated),
  a matmul, the gradient all-reduce; each shows up in its category, per device-step."""
  sys.path.insert(0, ROOT)
  from bench import profile_summary
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.standard_normal((4, 16, 16, 8), np.float32),
                     NamedSharding(mesh, P("data")))
  params = jax.device_put((rng.standard_normal((3, 3, 8, 8), np.float32),
                           rng.standard_normal((8, 8), np.float32)), NamedSharding(mesh, P()))

  def loss(params, x):
    w, v = params
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(y @ v) ** 2)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)),
                 out_shardings=NamedSharding(mesh, P())).lower(params, x).compile()
  jax.block_until_ready(step(params, x))
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(3):
    jax.block_until_ready(step(params, x))
  jax.profiler.stop_trace()
  summary = profile_summary.summarize(str(tmp_path), step.as_text(), steps=3, num_devices=2)
  s = summary["seconds_per_step"]
  assert set(s) == set(profile_summary.CATEGORIES)
  for category in ("convolution, forward", "convolution, weight gradient", "matmul",
                   "collective"):
    assert s[category] > 0, (category, summary)
  assert summary["total"] == pytest.approx(sum(s.values()))
  assert {op["category"] for op in summary["top"]} <= set(profile_summary.CATEGORIES)
  text = profile_summary.format_summary(summary)
  assert "convolution, weight gradient" in text and "per step per device" in text
  with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb"):
    profile_summary.summarize(str(tmp_path / "empty"), step.as_text(), steps=1, num_devices=1)


def test_train_step_bench_times_variants_of_our_step_in_alternating_rounds(tmp_path):
  """--variants: the A/B command of bench/README.md on the tiny shapes config. Each
  variant compiles a different program (XLA's filter gradient: more convolutions; no
  GroupNorm barrier: other fusions), all start from the same state and batch (the same
  loss, to float noise), and each step time comes with its ratio to the first's."""
  import json
  import subprocess
  out = tmp_path / "variants.json"
  command = [sys.executable, os.path.join(ROOT, "bench", "train_step.py"),
             "--config=" + os.path.join(ROOT, "configs", "shapes.py") + ":tiny",
             "--rounds=2", "--steps=1", "--warmup=0", f"--json_out={out}"]
  subprocess.run(command + ["--variants=default,no_groupnorm_barrier,xla_filter_gradient"],
                 cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
  v = json.loads(out.read_text())["variants"]
  assert list(v) == ["default", "no_groupnorm_barrier", "xla_filter_gradient"]
  assert v["default"]["step_ratio"] == 1.0
  for name, figures in v.items():
    assert len(figures["times"]) == 2
    assert figures["step_ratio"] == pytest.approx(figures["step_s"] / v["default"]["step_s"])
    assert figures["loss"] == pytest.approx(v["default"]["loss"], rel=1e-4), name
  assert v["xla_filter_gradient"]["hlo_convolutions"] > v["default"]["hlo_convolutions"]
  assert v["no_groupnorm_barrier"]["hlo_fusions"] != v["default"]["hlo_fusions"]
  bad = subprocess.run(command + ["--variants=default,faster"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "--variants takes" in bad.stderr


GPU_HLO = """HloModule jit_train_step

%fused_add (param_0: bf16[4,32,32,32], param_1: bf16[4,32,32,32]) -> bf16[4,32,32,32] {
  %param_0 = bf16[4,32,32,32]{3,2,1,0} parameter(0)
  %param_1 = bf16[4,32,32,32]{3,2,1,0} parameter(1)
  ROOT %add.1 = bf16[4,32,32,32]{3,2,1,0} add(%param_0, %param_1)
}

ENTRY %main (p0: bf16[4,32,32,64], p1: bf16[4,32,32,32], p2: bf16[3,3,64,32]) -> bf16[3,3,64,32] {
  %p0 = bf16[4,32,32,64]{3,2,1,0} parameter(0)
  %p1 = bf16[4,32,32,32]{3,2,1,0} parameter(1)
  %p2 = bf16[3,3,64,32]{3,2,1,0} parameter(2)
  %custom-call.1 = (bf16[3,3,64,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(train_step)/transpose(jvp(UNet))/conv"}
  %custom-call.2 = (bf16[4,32,32,64]{3,2,1,0}, u8[0]{0}) custom-call(%p1, %p2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01oi->b01f, custom_call_target="__cudnn$convBackwardInput"
  %custom-call.3 = (bf16[4,32,32,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %custom-call.4 = (bf16[4096,32]{1,0}, s8[4194304]{0}) custom-call(%p0, %p2), custom_call_target="__cublas$lt$matmul"
  %gte.3 = bf16[4,32,32,32]{3,2,1,0} get-tuple-element(%custom-call.3), index=0
  %loop_add_fusion = bf16[4,32,32,32]{3,2,1,0} fusion(%gte.3, %p1), kind=kLoop, calls=%fused_add
  ROOT %gte.1 = bf16[3,3,64,32]{3,2,1,0} get-tuple-element(%custom-call.1), index=0
}
"""


def test_profile_summary_reads_a_gpu_trace_by_its_kernels():
  """On a GPU the convolutions and matmuls are cuDNN / cuBLAS custom calls, one HLO
  instruction may run several kernels, and the host's launch events carry the same
  `hlo_op`: only the device's kernels count, summed per instruction and categorised by
  the call's target."""
  import collections
  sys.path.insert(0, ROOT)
  from bench import profile_summary
  Plane = collections.namedtuple("Plane", "name lines")
  Line = collections.namedtuple("Line", "name events")
  Event = collections.namedtuple("Event", "name duration_ns stats")
  kernel = lambda name, op, ns: Event(name, ns, [("hlo_op", op), ("hlo_module", "jit_step")])
  host = Plane("/host:CPU", [Line("launches", [
      kernel("custom-call.1", "custom-call.1", 10**9),
      kernel("other", "loop_add_fusion", 10**9)])])
  gpu = Plane("/device:GPU:0", [Line("Stream #13", [
      kernel("sm90_xmma_wgrad_a", "custom-call.1", 3000),
      kernel("sm90_xmma_wgrad_b", "custom-call.1", 1000),
      kernel("sm90_xmma_dgrad", "custom-call.2", 2000),
      kernel("sm90_xmma_fprop", "custom-call.3", 1500),
      kernel("sm90_gemm", "custom-call.4", 700),
      kernel("loop_add_fusion", "loop_add_fusion", 300),
      Event("MemcpyD2D", 5000, [])])])
  ops = profile_summary.parse_hlo(GPU_HLO)
  seconds = profile_summary.event_seconds([host, gpu], set(ops))
  assert seconds == pytest.approx({"custom-call.1": 4000e-9, "custom-call.2": 2000e-9,
                                   "custom-call.3": 1500e-9, "custom-call.4": 700e-9,
                                   "loop_add_fusion": 300e-9})
  categories = {name: profile_summary.categorize(ops[name]) for name in seconds}
  assert categories == {"custom-call.1": "convolution, weight gradient",
                        "custom-call.2": "convolution, input gradient",
                        "custom-call.3": "convolution, forward", "custom-call.4": "matmul",
                        "loop_add_fusion": "elementwise / reduce"}
  # On a CPU there is no device plane: the host's thunk events are the instructions.
  assert profile_summary.event_seconds([host], {"custom-call.1"}) == pytest.approx(
      {"custom-call.1": 1.0})

