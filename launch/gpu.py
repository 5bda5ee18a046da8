#!/usr/bin/env python3
r"""GPU nodes: one process per node, each driving all of its GPUs.

  # One node: nothing to coordinate, one process sees every local GPU.
  python launch/gpu.py local --config=configs/imagen_sr256.py:small --workdir=runs/sr256
  # Several nodes over ssh (the first host is the coordinator; the repository and the
  # package must be installed at the same path on every node, the workdir shared):
  python launch/gpu.py ssh --hosts=node1,node2 --repo_dir=/shared/imagen-jax \
      --config=configs/imagen_base64.py --workdir=/shared/runs/base64 --stage=base
  # SLURM: writes an sbatch script (JAX reads the coordinator and process ids from SLURM)
  python launch/gpu.py slurm --nodes=4 --gpus_per_node=8 --config=... --workdir=... \
      --script=base64.sbatch && sbatch base64.sbatch

--dry_run prints the commands (and the sbatch script) instead of running them. Arguments
after `--` go to imagen_jax.train (config overrides). Every mode resumes from the latest
checkpoint in the workdir; SIGTERM (SLURM's --signal, a scheduler) makes every process save
the same step and exit with 75, which the sbatch script requeues.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_PREEMPTED = 75  # imagen_jax.train.faults.EXIT_PREEMPTED
BASE_ENV = ("TF_CPP_MIN_LOG_LEVEL=2",)  # TensorFlow (the input pipeline) logs less


def train_argv(args, *distributed: str) -> list[str]:
  argv = [args.python, "-m", "imagen_jax.train", f"--config={args.config}",
          f"--workdir={args.workdir}"]
  if args.stage:
    argv.append(f"--stage={args.stage}")
  return argv + list(distributed) + args.overrides


def env_argv(args) -> list[str]:
  return ["env", *BASE_ENV, *args.env]


def local(args) -> None:
  command = env_argv(args) + train_argv(args)
  print(shlex.join(command), flush=True)
  if not args.dry_run:
    sys.exit(subprocess.run(command, cwd=REPO).returncode)


def ssh_commands(args) -> list[list[str]]:
  hosts = args.hosts.split(",")
  coordinator = f"{args.coordinator or hosts[0]}:{args.port}"
  commands = []
  for i, host in enumerate(hosts):
    train = train_argv(args, f"--coordinator_address={coordinator}",
                       f"--num_processes={len(hosts)}", f"--process_id={i}")
    log = f"{args.log_dir.rstrip('/')}/imagen_jax_train.process_{i}.log"
    remote = (f"cd {shlex.quote(args.repo_dir)} && {shlex.join(env_argv(args) + train)} "
              f"> {shlex.quote(log)} 2>&1")
    commands.append(["ssh", *args.ssh_option, host, remote])
  return commands


def ssh(args) -> None:
  """Starts one process per host and waits for all; exits with the first failure's code."""
  commands = ssh_commands(args)
  for command in commands:
    print(shlex.join(command) + " &", flush=True)
  if args.dry_run:
    print("wait")
    return
  processes = [subprocess.Popen(command) for command in commands]
  codes = [p.wait() for p in processes]
  print(f"exit codes: {codes}")
  bad = [c for c in codes if c]
  sys.exit(bad[0] if bad else 0)


def sbatch_script(args) -> str:
  train = train_argv(args, "--distributed")  # JAX reads SLURM's environment
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name={args.job_name}",
      f"#SBATCH --nodes={args.nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --cpus-per-task={args.cpus_per_task}",
      f"#SBATCH --time={args.time}",
      # SIGTERM 5 minutes before the time limit: every process saves the same step.
      "#SBATCH --signal=TERM@300",
      "#SBATCH --requeue",
      f"#SBATCH --output={args.log_dir.rstrip('/')}/%x-%j.out",
      *(f"#SBATCH {extra}" for extra in args.sbatch_option),
      "set -uo pipefail",
      f"cd {shlex.quote(args.repo_dir)}",
      f"srun {shlex.join(env_argv(args) + train)}",
      "code=$?",
      "# 75: stopped by SIGTERM after saving a checkpoint; run again to resume.",
      f'if [ "$code" -eq {EXIT_PREEMPTED} ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
      'exit "$code"',
  ]
  return "\n".join(lines) + "\n"


def slurm(args) -> None:
  script = sbatch_script(args)
  if args.dry_run or not args.script:
    print(script, end="")
  if args.script and not args.dry_run:
    with open(args.script, "w") as f:
      f.write(script)
    print(f"wrote {args.script}; submit it with: sbatch {args.script}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def command(name, fn, help_text):
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(fn=fn)
    p.add_argument("--config", required=True, help="e.g. configs/imagen_sr256.py[:variant]")
    p.add_argument("--workdir", required=True, help="Shared by all nodes.")
    p.add_argument("--stage", default=None, help="Train this stage only (default: all).")
    p.add_argument("--python", default="python3", help="Python with imagen_jax[cuda].")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra environment variable (repeatable).")
    p.add_argument("--dry_run", action="store_true", help="Print, run nothing.")
    p.add_argument("overrides", nargs="*", help="After --: more imagen_jax.train flags.")
    return p

  command("local", local, "One node, all its GPUs, one process.")

  p = command("ssh", ssh, "Several nodes over ssh.")
  p.add_argument("--hosts", required=True, help="Comma-separated; process i runs on host i.")
  p.add_argument("--coordinator", default=None, help="Address of process 0 (default: hosts[0]).")
  p.add_argument("--port", type=int, default=12355, help="Coordinator port.")
  p.add_argument("--repo_dir", default=REPO, help="This repository's path on every node.")
  p.add_argument("--log_dir", default="/tmp", help="Per-process logs on each node.")
  p.add_argument("--ssh_option", action="append", default=[], help="Extra ssh argument.")

  p = command("slurm", slurm, "An sbatch script for SLURM.")
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--cpus_per_task", type=int, default=32)
  p.add_argument("--time", default="24:00:00", help="Time limit per allocation.")
  p.add_argument("--job_name", default="imagen_jax")
  p.add_argument("--repo_dir", default=REPO, help="This repository's path on the nodes.")
  p.add_argument("--log_dir", default=".", help="Where SLURM writes the job's output.")
  p.add_argument("--sbatch_option", action="append", default=[],
                 help="Extra #SBATCH line, e.g. --partition=gpu (repeatable).")
  p.add_argument("--script", default=None, help="Write the script here (else print it).")

  args = parser.parse_args(argv)
  if "--dry_run" in getattr(args, "overrides", []):
    parser.error("--dry_run goes before `--` (after it, arguments go to imagen_jax.train).")
  for item in args.env:
    if "=" not in item:
      parser.error(f"--env {item!r}: use KEY=VALUE.")
  args.fn(args)


if __name__ == "__main__":
  main()
