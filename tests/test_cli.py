"""The train and sample entry points end to end, at tiny size, as a user runs them.

The commands run in the background lane (tests/background.py) from the start of the
session; the test asserts on their outputs at the end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import background
from fast_compile import xla_flags
from small_configs import minimal_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The entry points run as on a laptop: one CPU device per core (config.cpu_devices), so the
# trained cascade is evaluated and sampled on one device after training on several.
ENV = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags(),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run(args):
  return background.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, timeout=900)


def train_then_sample(tmp_path):
  """Train the tiny cascade, run the command again (nothing left to train), sample it.
  Returns (tmp_path, {command: CompletedProcess} of those that ran, up to a failure)."""
  workdir = str(tmp_path / "run")
  data_dir = str(tmp_path / "tfds")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle at the top\ntwo blue squares\n")
  # One-level U-Nets without attention (tests/small_configs.py): what these commands do
  # (stages in order, checkpoints, resume, evaluation, sampling from the workdir) does not
  # depend on the model, and the tiny config's two-level U-Nets with attention compile for
  # ~2x longer in every process (measured: the three commands 115 -> 97 CPU-s against
  # one-level U-Nets with attention). test_unet.py covers the models; test_editing.py
  # samples the tiny config's own U-Nets from a workdir.
  train = ["imagen_jax.train", "--config=configs/shapes.py:tiny", f"--workdir={workdir}",
           f"--config.data_dir={data_dir}", "--config.stages.sr.train.num_steps=2",
           *minimal_flags()]
  commands = {
      "train": train,
      "again": [*train, "--config.eval.after_training=False"],
      "sample": ["imagen_jax.sample", f"--workdir={workdir}",
                 "--prompt=a green triangle on the left", f"--prompts_file={prompts}",
                 f"--output_dir={tmp_path / 'samples'}", "--num_per_prompt=2",
                 "--guidance=base=2,sr=1", "--steps=sr=3", "--thresholding=base=dynamic"],
  }
  results = {}
  for name, args in commands.items():
    results[name] = run(args)
    if results[name].returncode != 0:
      break
  return tmp_path, results


@pytest.mark.background.with_args(train_then_sample)
def test_train_then_sample():
  tmp_path, results = background.result(train_then_sample)
  workdir = os.path.join(tmp_path, "run")
  for result in results.values():
    assert result.returncode == 0, result.stderr[-4000:]
  log = results["train"].stderr
  assert "[base] step 4/4" in log and "[sr] step 2/2" in log, log[-3000:]
  assert "img/s" in log and "ETA" in log

  # Checkpoints, TensorBoard events, sample grids, the saved encoder and config.
  for stage, step in (("base", 4), ("sr", 2)):
    assert os.path.isdir(os.path.join(workdir, stage, "checkpoints", str(step)))
    assert os.listdir(os.path.join(workdir, stage, "tensorboard"))
    assert os.path.exists(os.path.join(workdir, stage, "samples", f"step_{step:07d}.png"))
  assert os.path.exists(os.path.join(workdir, "text_encoder", "t5_config.json"))

  # The alignment report of the main job, in its documented format.
  with open(os.path.join(workdir, "eval", "shapes_alignment.json")) as f:
    report = json.load(f)
  for group in ("single_object", "multi_object", "held_out"):
    for attr in ("colour", "shape", "count", "position"):
      acc = report[group][attr]["accuracy"]
      assert acc is None or 0.0 <= acc <= 1.0
      assert report[group][attr]["n"] >= 0
  assert set(report["chance"]) == {"colour", "shape", "count", "position"}
  assert report["resolution"] == 32 and report["wall_time_s"] > 0

  # A second invocation resumes: nothing left to train, the checkpoints are reused.
  assert "already trained to step 4" in results["again"].stderr

  # Sampling from the workdir: per-stage settings, one PNG per image, a grid.
  out = os.path.join(tmp_path, "samples")
  files = sorted(f for f in os.listdir(out) if f.endswith(".png") and f != "grid.png")
  assert len(files) == 6
  image = np.asarray(Image.open(os.path.join(out, files[0])))
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert len(os.listdir(os.path.join(out, "stage_base"))) == 6
  assert Image.open(os.path.join(out, "grid.png")).size[0] > 32


def test_sample_rejects_unknown_stage(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "imagen_jax.sample", f"--workdir={tmp_path}", "--prompt=x"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
  assert result.returncode != 0
  assert "config.json not found" in result.stderr
