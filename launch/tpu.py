#!/usr/bin/env python3
r"""Cloud TPU VMs (v4, one host or a pod slice) around `gcloud compute tpus`.

  python launch/tpu.py create --name=imagen --zone=us-central2-b --accelerator_type=v4-256 [--spot] [--queued]
  python launch/tpu.py setup  --name=imagen --zone=us-central2-b
  python launch/tpu.py train  --name=imagen --zone=us-central2-b --config=configs/imagen_base64.py \
      --workdir=gs://BUCKET/runs/base64 --stage=base -- --config.stages.base.embeddings_dir=gs://BUCKET/emb
  python launch/tpu.py exec   --name=imagen --zone=us-central2-b -- python3 -m imagen_jax.encode_text ...
  python launch/tpu.py logs   --name=imagen --zone=us-central2-b [--worker=0]
  python launch/tpu.py stop   --name=imagen --zone=us-central2-b   # SIGTERM: save, then exit 75
  python launch/tpu.py delete --name=imagen --zone=us-central2-b [--queued]

Every subcommand takes --dry_run: print the exact commands instead of running them.

Several slices (multi-slice, BUILD_TPU.md): `create --queued --num_slices=N` asks for N
slices of --accelerator_type in one queued resource (`--node-count=N --node-prefix=NAME`);
its TPU VMs are NAME-0 .. NAME-(N-1). Pass the same --num_slices to every later
subcommand: each then acts on the workers of all N slices (train and exec start them all
at once), logs follows worker 0 of NAME-0 (JAX's process 0). JAX joins the slices by
itself (the MEGASCALE_* values of the slices' TPU metadata); the config must name them
(`config.mesh.slice = N`, configs/imagen_common.py `multislice`).

- create: a TPU VM (`tpu-vm create`) or, with --queued, a queued resource (`queued-resources
  create`, then waits until it is ACTIVE): the way to get large slices and spot capacity.
- setup: copies this checkout to every worker (`tpu-vm scp --worker=all`) and installs it
  with the [tpu] extra (jax with libtpu); or, with --git_url, installs from a git URL.
- train: starts `python3 -m imagen_jax.train ... --distributed` on every worker at once
  (one process per host; JAX reads the slice's layout from the TPU metadata), detached
  (nohup), its output in ~/imagen_jax_train.log and its pid in ~/imagen_jax_train.pid of
  each worker. Arguments after `--` go to imagen_jax.train (config overrides). The same
  command resumes a stopped or preempted run from its latest checkpoint in --workdir.
- exec: runs any command after `--` in the package directory of every worker (or one),
  in the foreground, e.g. `python3 -m imagen_jax.encode_text ... --distributed`.
- logs: follows worker 0's log (host 0 logs training; the others log warnings and errors).
- stop: sends SIGTERM to the training process on every worker: they save a checkpoint at
  the same step and exit with code 75.
- delete: deletes the TPU VM (or the queued resource and its VM).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "imagen_jax"  # on each worker, under the home directory
LOG = "imagen_jax_train.log"
PID = "imagen_jax_train.pid"
# v4 TPU VMs: the Ubuntu 22.04 base image; jax[tpu] brings libtpu (see setup.py's [tpu] extra).
DEFAULT_VERSION = "tpu-ubuntu2204-base"


def run(command: list[str], dry_run: bool, check: bool = True) -> int:
  """Prints the command; runs it unless dry_run."""
  print(shlex.join(command), flush=True)
  if dry_run:
    return 0
  return subprocess.run(command, check=check).returncode


def run_all(commands: list[list[str]], dry_run: bool, check: bool = True) -> int:
  """Prints the commands; unless dry_run runs them at once (one per slice: a program that
  spans the slices needs all of them started) and waits for all. Returns the first
  non-zero exit code (or 0)."""
  if len(commands) == 1:
    return run(commands[0], dry_run, check)
  for command in commands:
    print(shlex.join(command), flush=True)
  if dry_run:
    return 0
  processes = [subprocess.Popen(command) for command in commands]
  codes = [p.wait() for p in processes]
  failed = [(c, code) for c, code in zip(commands, codes) if code]
  if failed and check:
    raise subprocess.CalledProcessError(failed[0][1], failed[0][0])
  return failed[0][1] if failed else 0


def nodes(args) -> list[str]:
  """The TPU VMs: --name itself, or NAME-0 .. NAME-(N-1) for --num_slices=N (the names a
  multi-slice queued resource gives them)."""
  if args.num_slices == 1:
    return [args.name]
  return [f"{args.name}-{i}" for i in range(args.num_slices)]


def _location(args) -> list[str]:
  flags = [f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  return flags


def tpu_vm(args, verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, *_location(args)]


def ssh(args, remote_command: str, worker: str = "all", node: str | None = None) -> list[str]:
  return tpu_vm(args, "ssh", node or args.name, f"--worker={worker}",
                f"--command={remote_command}")


def ssh_all(args, remote_command: str, worker: str = "all") -> list[list[str]]:
  """One ssh command per TPU VM (per slice), each on `worker` of that VM."""
  return [ssh(args, remote_command, worker, node) for node in nodes(args)]


def _multislice_needs_queued(args, what: str) -> None:
  if args.num_slices > 1 and not args.queued:
    sys.exit(f"{what} --num_slices={args.num_slices}: several slices are one queued resource; "
             "add --queued.")


def create(args) -> None:
  _multislice_needs_queued(args, "create")
  if args.queued:
    # One slice: one TPU VM named NAME; several: NAME-0 .. NAME-(N-1), one per slice.
    node = ([f"--node-id={args.name}"] if args.num_slices == 1 else
            [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"])
    command = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
               *node, f"--accelerator-type={args.accelerator_type}",
               f"--runtime-version={args.version}", *_location(args)]
    if args.spot:
      command.append("--spot")
    if args.reserved:
      command.append("--reserved")
    if args.valid_until_duration:
      command.append(f"--valid-until-duration={args.valid_until_duration}")
    run(command, args.dry_run)
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name,
                *_location(args), "--format=value(state.state)"]
    if args.dry_run:
      print(f"# then, every 60 s until it prints ACTIVE:\n{shlex.join(describe)}")
      return
    while True:
      state = subprocess.run(describe, check=True, capture_output=True, text=True).stdout.strip()
      print(f"queued resource {args.name}: {state}", flush=True)
      if state == "ACTIVE":
        return
      if state in ("FAILED", "SUSPENDED"):
        sys.exit(f"queued resource {args.name} is {state}; see `gcloud compute tpus "
                 f"queued-resources describe {args.name}`.")
      time.sleep(60)
  command = tpu_vm(args, "create", args.name, f"--accelerator-type={args.accelerator_type}",
                   f"--version={args.version}")
  if args.spot:
    command.append("--spot")
  if args.reserved:
    command.append("--reserved")
  run(command, args.dry_run)


def setup(args) -> None:
  pip = f'python3 -m pip install -q -U pip && python3 -m pip install -q -e ".[{args.extras}]"'
  if args.git_url:
    ref = f" && git checkout -q {shlex.quote(args.git_ref)}" if args.git_ref else ""
    remote = (f"set -e; rm -rf ~/{REMOTE_DIR}; git clone -q {shlex.quote(args.git_url)} "
              f"~/{REMOTE_DIR}; cd ~/{REMOTE_DIR}{ref}; {pip}")
    run_all(ssh_all(args, remote), args.dry_run)
    return
  tarball = f"/tmp/{args.name}-imagen_jax.tar.gz"
  run(["tar", "-czf", tarball, "--exclude=.git", "--exclude=./runs", "--exclude=__pycache__",
       "-C", args.source, "."], args.dry_run)
  for node in nodes(args):
    run(tpu_vm(args, "scp", tarball, f"{node}:{REMOTE_DIR}.tar.gz", "--worker=all"),
        args.dry_run)
  remote = (f"set -e; rm -rf ~/{REMOTE_DIR}; mkdir -p ~/{REMOTE_DIR}; "
            f"tar -xzf ~/{REMOTE_DIR}.tar.gz -C ~/{REMOTE_DIR}; cd ~/{REMOTE_DIR}; {pip}")
  run_all(ssh_all(args, remote), args.dry_run)


def train_command(args) -> str:
  """The shell command every worker runs (detached unless --foreground)."""
  env = [f"JAX_COMPILATION_CACHE_DIR={args.compilation_cache or args.workdir.rstrip('/') + '/jax_cache'}",
         "TF_CPP_MIN_LOG_LEVEL=2", *args.env]
  train = ["python3", "-m", "imagen_jax.train", f"--config={args.config}",
           f"--workdir={args.workdir}", "--distributed"]
  if args.stage:
    train.append(f"--stage={args.stage}")
  train += args.overrides
  command = shlex.join(["env", *env, *train])
  if args.foreground:
    return f"cd ~/{REMOTE_DIR} && {command}"
  # Detached: the job outlives the ssh session; the same command later resumes it.
  return (f"cd ~/{REMOTE_DIR} && (nohup {command} > ~/{LOG} 2>&1 < /dev/null & "
          f"echo $! > ~/{PID})")


def train(args) -> None:
  run_all(ssh_all(args, train_command(args)), args.dry_run)
  if args.follow and not args.foreground:
    logs(args)


def exec_(args) -> None:
  """Runs a command in the package directory of the workers (foreground)."""
  if not args.overrides:
    sys.exit("exec: give the command after --, e.g. -- python3 -m imagen_jax.encode_text ...")
  command = shlex.join(["env", "TF_CPP_MIN_LOG_LEVEL=2", *args.env, *args.overrides])
  run_all(ssh_all(args, f"cd ~/{REMOTE_DIR} && {command}", worker=args.worker), args.dry_run)


def logs(args) -> None:
  worker = getattr(args, "worker", "0")
  # Several slices: the first slice's VM, whose worker 0 is JAX's process 0.
  run(ssh(args, f"tail -n +1 -F ~/{LOG}", worker=worker, node=nodes(args)[0]), args.dry_run,
      check=False)


def stop(args) -> None:
  run_all(ssh_all(args, f"if [ -f ~/{PID} ]; then kill -TERM $(cat ~/{PID}) 2>/dev/null || "
                        "true; fi"), args.dry_run)


def delete(args) -> None:
  _multislice_needs_queued(args, "delete")
  if args.queued:
    run(["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_location(args),
         "--force", "--quiet"], args.dry_run)
  else:
    run(tpu_vm(args, "delete", args.name, "--quiet"), args.dry_run)


def status(args) -> None:
  _multislice_needs_queued(args, "status")
  if args.queued:
    run(["gcloud", "compute", "tpus", "queued-resources", "describe", args.name,
         *_location(args)], args.dry_run)
  else:
    run(tpu_vm(args, "describe", args.name), args.dry_run)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def command(name, fn, help_text):
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(fn=fn)
    p.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4).")
    p.add_argument("--project", default=None, help="Default: gcloud's configured project.")
    p.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
    p.add_argument("--num_slices", type=int, default=1,
                   help="Slices of a multi-slice queued resource (its VMs: NAME-0, NAME-1, ...).")
    return p

  p = command("create", create, "Create a TPU VM or pod slice.")
  p.add_argument("--accelerator_type", default="v4-8", help="v4-8 (one host), v4-32, v4-256, ...")
  p.add_argument("--version", default=DEFAULT_VERSION, help="TPU VM runtime (software) version.")
  p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper).")
  p.add_argument("--reserved", action="store_true", help="Use the project's reservation.")
  p.add_argument("--queued", action="store_true", help="Through a queued resource.")
  p.add_argument("--valid_until_duration", default=None,
                 help="--queued: give up if not provisioned within this (e.g. 6h).")

  p = command("setup", setup, "Install this package on every worker.")
  p.add_argument("--source", default=REPO, help="Local checkout to copy (default: this one).")
  p.add_argument("--git_url", default=None, help="Clone this instead of copying --source.")
  p.add_argument("--git_ref", default=None, help="With --git_url: branch, tag or commit.")
  p.add_argument("--extras", default="tpu", help="pip extras to install.")

  p = command("train", train, "Run imagen_jax.train on every worker.")
  p.add_argument("--config", required=True, help="e.g. configs/imagen_base64.py[:variant]")
  p.add_argument("--workdir", required=True, help="Shared by all workers: gs://BUCKET/...")
  p.add_argument("--stage", default=None, help="Train this stage only (default: all).")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="Extra environment variable for the job (repeatable).")
  p.add_argument("--compilation_cache", default=None,
                 help="JAX's persistent compilation cache (default: WORKDIR/jax_cache).")
  p.add_argument("--foreground", action="store_true",
                 help="Stay attached (stream every worker's output) instead of nohup.")
  p.add_argument("--follow", action="store_true", help="Then follow worker 0's log.")
  p.add_argument("overrides", nargs="*", help="After --: more imagen_jax.train flags.")

  p = command("exec", exec_, "Run any command (after --) on the workers, e.g. encode_text.")
  p.add_argument("--worker", default="all", help="all, or one worker's index.")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="Extra environment variable (repeatable).")
  p.add_argument("overrides", nargs="*", help="After --: the command.")

  p = command("logs", logs, "Follow a worker's training log.")
  p.add_argument("--worker", default="0", help="Worker index (0 logs training).")

  command("stop", stop, "SIGTERM the job on every worker (checkpoint, exit 75).")

  for name, fn, text in (("delete", delete, "Delete the TPU VM / queued resource."),
                         ("status", status, "Describe the TPU VM / queued resource.")):
    p = command(name, fn, text)
    p.add_argument("--queued", action="store_true", help="It was created with --queued.")

  args = parser.parse_args(argv)
  if args.num_slices < 1:
    parser.error(f"--num_slices={args.num_slices} must be >= 1.")
  if "--dry_run" in getattr(args, "overrides", []):
    parser.error("--dry_run goes before `--` (after it, arguments go to imagen_jax.train).")
  for item in getattr(args, "env", []):
    if "=" not in item:
      parser.error(f"--env {item!r}: use KEY=VALUE.")
  args.fn(args)


if __name__ == "__main__":
  main()
