"""launch/: the exact commands of every launcher's dry run (nothing is executed: gcloud,
ssh, tar, sbatch and python are stubs on PATH that record any call, and none may happen)."""
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZONE = "us-central2-b"


@pytest.fixture()
def stubs(tmp_path):
  """PATH with stubs of every command a launcher could run; returns the call log path."""
  calls = tmp_path / "calls"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "ssh", "tar", "sbatch", "srun", "python", "python3"):
    stub = bin_dir / name
    stub.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\nexit 1\n")
    stub.chmod(0o755)
  return {"path": f"{bin_dir}:{os.environ['PATH']}", "calls": calls}


def dry_run(stubs, *argv):
  """Runs a launcher (python launch/X.py or a shell script) with --dry_run; its output
  lines. Asserts that it ran nothing."""
  command = list(argv) if argv[0].endswith(".sh") else [sys.executable, *argv]
  env = dict(os.environ, PATH=stubs["path"])
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert not stubs["calls"].exists(), stubs["calls"].read_text()
  return out.stdout.splitlines()


def tpu(stubs, *argv):
  return dry_run(stubs, "launch/tpu.py", *argv[:1], "--name=imagen", f"--zone={ZONE}",
                 "--dry_run", *argv[1:])


# ---- TPU VMs ----

def test_create_vm_and_pod_slice(stubs):
  assert tpu(stubs, "create") == [
      f"gcloud compute tpus tpu-vm create imagen --accelerator-type=v4-8 "
      f"--version=tpu-ubuntu2204-base --zone={ZONE}"]
  assert tpu(stubs, "create", "--accelerator_type=v4-256", "--spot", "--project=my-proj") == [
      f"gcloud compute tpus tpu-vm create imagen --accelerator-type=v4-256 "
      f"--version=tpu-ubuntu2204-base --zone={ZONE} --project=my-proj --spot"]


def test_create_queued_resource(stubs):
  assert tpu(stubs, "create", "--accelerator_type=v4-128", "--queued", "--spot",
             "--valid_until_duration=6h") == [
      f"gcloud compute tpus queued-resources create imagen --node-id=imagen "
      f"--accelerator-type=v4-128 --runtime-version=tpu-ubuntu2204-base --zone={ZONE} --spot "
      "--valid-until-duration=6h",
      "# then, every 60 s until it prints ACTIVE:",
      f"gcloud compute tpus queued-resources describe imagen --zone={ZONE} "
      "'--format=value(state.state)'"]


def test_setup_copies_this_checkout_to_every_worker(stubs):
  lines = tpu(stubs, "setup")
  assert lines[:2] == [
      f"tar -czf /tmp/imagen-imagen_jax.tar.gz --exclude=.git --exclude=./runs "
      f"--exclude=__pycache__ -C {REPO} .",
      f"gcloud compute tpus tpu-vm scp /tmp/imagen-imagen_jax.tar.gz imagen:imagen_jax.tar.gz "
      f"--worker=all --zone={ZONE}"]
  ssh = shlex.split(lines[2])
  assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "imagen", "--worker=all"]
  assert ssh[8:] == [f"--zone={ZONE}"] and len(lines) == 3
  assert ssh[7] == (
      "--command=set -e; rm -rf ~/imagen_jax; mkdir -p ~/imagen_jax; "
      "tar -xzf ~/imagen_jax.tar.gz -C ~/imagen_jax; cd ~/imagen_jax; "
      'python3 -m pip install -q -U pip && python3 -m pip install -q -e ".[tpu]"')


def test_setup_from_git(stubs):
  (line,) = tpu(stubs, "setup", "--git_url=https://github.com/me/imagen-jax", "--git_ref=v0.1")
  assert shlex.split(line)[7] == (
      "--command=set -e; rm -rf ~/imagen_jax; git clone -q https://github.com/me/imagen-jax "
      "~/imagen_jax; cd ~/imagen_jax && git checkout -q v0.1; "
      'python3 -m pip install -q -U pip && python3 -m pip install -q -e ".[tpu]"')


def test_train_runs_on_every_worker_detached(stubs):
  (line,) = tpu(stubs, "train", "--config=configs/imagen_base64.py",
                "--workdir=gs://bucket/runs/base64", "--stage=base", "--env=LIBTPU_INIT_ARGS=--x",
                "--", "--config.stages.base.embeddings_dir=gs://bucket/emb",
                "--config.mesh.fsdp=16")
  ssh = shlex.split(line)
  assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "imagen", "--worker=all"]
  assert ssh[7] == (
      "--command=cd ~/imagen_jax && (nohup env "
      "JAX_COMPILATION_CACHE_DIR=gs://bucket/runs/base64/jax_cache TF_CPP_MIN_LOG_LEVEL=2 "
      "LIBTPU_INIT_ARGS=--x python3 -m imagen_jax.train --config=configs/imagen_base64.py "
      "--workdir=gs://bucket/runs/base64 --distributed --stage=base "
      "--config.stages.base.embeddings_dir=gs://bucket/emb --config.mesh.fsdp=16 "
      "> ~/imagen_jax_train.log 2>&1 < /dev/null & echo $! > ~/imagen_jax_train.pid)")


def test_train_foreground_then_logs_stop_delete(stubs):
  (line,) = tpu(stubs, "train", "--config=configs/shapes.py", "--workdir=gs://b/w", "--foreground",
                "--compilation_cache=gs://b/cache")
  assert shlex.split(line)[7] == (
      "--command=cd ~/imagen_jax && env JAX_COMPILATION_CACHE_DIR=gs://b/cache "
      "TF_CPP_MIN_LOG_LEVEL=2 python3 -m imagen_jax.train --config=configs/shapes.py "
      "--workdir=gs://b/w --distributed")
  assert tpu(stubs, "logs") == [
      f"gcloud compute tpus tpu-vm ssh imagen --worker=0 "
      f"'--command=tail -n +1 -F ~/imagen_jax_train.log' --zone={ZONE}"]
  assert tpu(stubs, "stop") == [
      "gcloud compute tpus tpu-vm ssh imagen --worker=all '--command=if [ -f "
      "~/imagen_jax_train.pid ]; then kill -TERM $(cat ~/imagen_jax_train.pid) 2>/dev/null || "
      f"true; fi' --zone={ZONE}"]
  assert tpu(stubs, "delete") == [f"gcloud compute tpus tpu-vm delete imagen --quiet --zone={ZONE}"]
  assert tpu(stubs, "delete", "--queued") == [
      f"gcloud compute tpus queued-resources delete imagen --zone={ZONE} --force --quiet"]


def test_exec_any_command_on_the_workers(stubs):
  (line,) = tpu(stubs, "exec", "--", "python3", "-m", "imagen_jax.encode_text", "--distributed",
                "--tfrecords=gs://b/data/*.tfrecord", "--output_dir=gs://b/emb")
  ssh = shlex.split(line)
  assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "imagen", "--worker=all"]
  assert ssh[7:] == [
      "--command=cd ~/imagen_jax && env TF_CPP_MIN_LOG_LEVEL=2 python3 -m imagen_jax.encode_text "
      "--distributed '--tfrecords=gs://b/data/*.tfrecord' --output_dir=gs://b/emb",
      f"--zone={ZONE}"]


def test_multislice_queued_resource_and_every_slice(stubs):
  """--num_slices=2: one queued resource of two slices (VMs imagen-0, imagen-1); setup,
  train and stop reach the workers of both, logs follows worker 0 of the first."""
  assert tpu(stubs, "create", "--accelerator_type=v4-128", "--queued", "--num_slices=2",
             "--spot")[0] == (
      "gcloud compute tpus queued-resources create imagen --node-count=2 --node-prefix=imagen "
      f"--accelerator-type=v4-128 --runtime-version=tpu-ubuntu2204-base --zone={ZONE} --spot")
  setup = tpu(stubs, "setup", "--num_slices=2")
  assert setup[0].startswith("tar -czf /tmp/imagen-imagen_jax.tar.gz")
  assert [shlex.split(line)[:7] for line in setup[1:]] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/imagen-imagen_jax.tar.gz",
       "imagen-0:imagen_jax.tar.gz"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/imagen-imagen_jax.tar.gz",
       "imagen-1:imagen_jax.tar.gz"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "imagen-0", "--worker=all"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "imagen-1", "--worker=all"]]
  train = [shlex.split(line) for line in tpu(
      stubs, "train", "--num_slices=2", "--config=configs/my_imagen.py", "--workdir=gs://b/w",
      "--stage=base")]
  assert [t[:7] for t in train] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", f"imagen-{i}", "--worker=all"]
      for i in range(2)]
  assert train[0][7:] == train[1][7:]
  assert "python3 -m imagen_jax.train --config=configs/my_imagen.py --workdir=gs://b/w " \
         "--distributed --stage=base" in train[0][7]
  assert tpu(stubs, "logs", "--num_slices=2") == [
      f"gcloud compute tpus tpu-vm ssh imagen-0 --worker=0 "
      f"'--command=tail -n +1 -F ~/imagen_jax_train.log' --zone={ZONE}"]
  assert [shlex.split(line)[5] for line in tpu(stubs, "stop", "--num_slices=2")] == [
      "imagen-0", "imagen-1"]
  assert tpu(stubs, "delete", "--queued", "--num_slices=2") == [
      f"gcloud compute tpus queued-resources delete imagen --zone={ZONE} --force --quiet"]
  # Several slices exist only as a queued resource.
  out = subprocess.run([sys.executable, "launch/tpu.py", "create", "--name=i", f"--zone={ZONE}",
                        "--num_slices=2", "--dry_run"], cwd=REPO,
                       env=dict(os.environ, PATH=stubs["path"]), capture_output=True, text=True)
  assert out.returncode == 1 and "several slices are one queued resource; add --queued" in out.stderr
  assert not stubs["calls"].exists()


def test_dry_run_after_the_separator_is_refused(stubs):
  out = subprocess.run([sys.executable, "launch/tpu.py", "train", "--name=i", f"--zone={ZONE}",
                        "--config=c", "--workdir=w", "--", "--dry_run"], cwd=REPO,
                       env=dict(os.environ, PATH=stubs["path"]), capture_output=True, text=True)
  assert out.returncode == 2 and "--dry_run goes before `--`" in out.stderr
  assert not stubs["calls"].exists()


# ---- GPU nodes ----

def test_gpu_one_node(stubs):
  assert dry_run(stubs, "launch/gpu.py", "local", "--config=configs/imagen_sr256.py:small",
                 "--workdir=runs/sr256", "--dry_run", "--", "--config.seed=1") == [
      "env TF_CPP_MIN_LOG_LEVEL=2 python3 -m imagen_jax.train "
      "--config=configs/imagen_sr256.py:small --workdir=runs/sr256 --config.seed=1"]


def test_gpu_nodes_over_ssh(stubs):
  lines = dry_run(stubs, "launch/gpu.py", "ssh", "--hosts=node1,node2,node3",
                  "--repo_dir=/shared/imagen-jax", "--config=configs/imagen_base64.py",
                  "--workdir=/shared/runs/base64", "--stage=base", "--port=9999",
                  "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=.9", "--dry_run")
  assert lines[-1] == "wait" and len(lines) == 4
  for i, line in enumerate(lines[:3]):
    assert line.endswith(" &")
    ssh = shlex.split(line[:-2])
    assert ssh[:2] == ["ssh", f"node{i + 1}"] and len(ssh) == 3
    assert ssh[2] == (
        "cd /shared/imagen-jax && env TF_CPP_MIN_LOG_LEVEL=2 "
        "XLA_PYTHON_CLIENT_MEM_FRACTION=.9 python3 -m imagen_jax.train "
        "--config=configs/imagen_base64.py --workdir=/shared/runs/base64 --stage=base "
        f"--coordinator_address=node1:9999 --num_processes=3 --process_id={i} "
        f"> /tmp/imagen_jax_train.process_{i}.log 2>&1")


def test_gpu_slurm_script(stubs):
  lines = dry_run(stubs, "launch/gpu.py", "slurm", "--nodes=4", "--gpus_per_node=8",
                  "--repo_dir=/shared/imagen-jax", "--config=configs/imagen_base64.py",
                  "--workdir=/shared/runs/base64", "--sbatch_option=--partition=a100",
                  "--dry_run")
  assert lines == [
      "#!/bin/bash",
      "#SBATCH --job-name=imagen_jax",
      "#SBATCH --nodes=4",
      "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gpus-per-node=8",
      "#SBATCH --cpus-per-task=32",
      "#SBATCH --time=24:00:00",
      "#SBATCH --signal=TERM@300",
      "#SBATCH --requeue",
      "#SBATCH --output=./%x-%j.out",
      "#SBATCH --partition=a100",
      "set -uo pipefail",
      "cd /shared/imagen-jax",
      "srun env TF_CPP_MIN_LOG_LEVEL=2 python3 -m imagen_jax.train "
      "--config=configs/imagen_base64.py --workdir=/shared/runs/base64 --distributed",
      "code=$?",
      "# 75: stopped by SIGTERM after saving a checkpoint; run again to resume.",
      'if [ "$code" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
      'exit "$code"']


def test_gpu_slurm_script_file(stubs, tmp_path):
  script = tmp_path / "job.sbatch"
  out = subprocess.run([sys.executable, "launch/gpu.py", "slurm", "--nodes=2", "--config=c",
                        "--workdir=w", f"--script={script}"], cwd=REPO,
                       env=dict(os.environ, PATH=stubs["path"]), capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout == f"wrote {script}; submit it with: sbatch {script}\n"
  assert script.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=imagen_jax\n")
  assert not stubs["calls"].exists()


# ---- This machine ----

def test_local_sh(stubs):
  env = dict(os.environ, PATH=stubs["path"], DRY_RUN="1")
  out = subprocess.run(["bash", "launch/local.sh", "configs/shapes.py:tiny", "/tmp/w",
                        "--config.seed=1"], cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert not stubs["calls"].exists()
  train, sample = out.stdout.splitlines()
  assert shlex.split(train) == ["python", "-m", "imagen_jax.train",
                                "--config=configs/shapes.py:tiny", "--workdir=/tmp/w",
                                "--config.seed=1"]
  assert shlex.split(sample) == [
      "python", "-m", "imagen_jax.sample", "--workdir=/tmp/w", "--output_dir=/tmp/w/samples",
      "--prompt=a red circle at the top", "--prompt=two blue squares",
      "--prompt=a green triangle left of a yellow circle", "--num_per_prompt=4"]
