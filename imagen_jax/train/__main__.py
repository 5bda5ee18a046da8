r"""Trains a cascade: python -m imagen_jax.train --config=configs/FILE.py --workdir=DIR.

  python -m imagen_jax.train --config=configs/shapes.py --workdir=runs/shapes
  python -m imagen_jax.train --config=configs/shapes.py --workdir=runs/shapes --stage=sr \
      --config.stages.sr.train.num_steps=3000

Without --stage every stage trains in order (and, if config.eval.after_training, the
cascade is evaluated at the end); with it, only that stage (what a pod job does). A run
resumes from the latest checkpoint in the workdir.

Several hosts (a TPU pod slice, GPU nodes): run the same command on every host with
--distributed. On Cloud TPU VMs (and under SLURM / Open MPI) JAX finds the coordinator and
the process ids itself; elsewhere add --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I. The workdir must be shared by all hosts (gs://... or a shared disk); each
host reads its share of every batch, host 0 writes the logs, TensorBoard events and sample
grids, and every host writes its shards of each checkpoint. See launch/ and BUILD_TPU.md.

On SIGTERM the run saves a checkpoint at the next step boundary and exits with code 75
(EX_TEMPFAIL: rerun the same command to resume); with several hosts, all of them stop at
the same step whichever received it. A SIGKILLed run resumes from its last complete
checkpoint.
"""
import contextlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from imagen_jax import host_malloc

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("stage", None, "Train only this stage (default: all, in order).")
flags.DEFINE_bool("distributed", False,
                  "Start the JAX distributed runtime (one process per host). Without the three "
                  "flags below, JAX reads them from the TPU VM / SLURM / Open MPI environment "
                  "or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, reachable by all hosts (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) of the run.")
flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes - 1.")
flags.DEFINE_list("local_device_ids", None,
                  "GPUs: the local device ids this process uses (default: all).")
FLAGS = flags.FLAGS


def _start_distributed() -> bool:
  """Initializes the distributed runtime if asked to; returns whether this is multi-host."""
  if not (FLAGS.distributed or FLAGS.coordinator_address):
    return False
  from imagen_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      None if FLAGS.local_device_ids is None else [int(i) for i in FLAGS.local_device_ids])
  if not distributed.is_multihost():
    return False
  # orbax's barriers through the runtime's key-value store (with timeouts), not through
  # device collectives, which give up when hosts reach them far apart (e.g. after reading
  # a large checkpoint at different speeds).
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel,unused-import  (defines the flag)
  FLAGS.experimental_orbax_use_distributed_barrier = True
  if not distributed.is_host0():  # one host speaks; the others only warn and fail
    logging.set_verbosity(logging.WARNING)
  return True


def _keep_tensorflow_off_gpus() -> None:
  """The input pipeline (tf.data) runs on the CPU; without this, TensorFlow would reserve
  GPU memory that JAX needs."""
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  tf.config.set_visible_devices([], "GPU")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  t0 = time.time()
  from imagen_jax.parallel import cpu_devices  # pylint: disable=import-outside-toplevel
  cpu_devices.apply(FLAGS.config)  # before anything touches a device
  multihost = _start_distributed()
  from imagen_jax.train import faults  # pylint: disable=import-outside-toplevel

  config = FLAGS.config
  # Several hosts: own SIGTERM from here on (JAX's distributed runtime would otherwise
  # swallow one that arrives during set-up); training then stops at its first step.
  sigterm = faults.handle_sigterm() if multihost else contextlib.nullcontext()
  try:
    with sigterm:
      _keep_tensorflow_off_gpus()
      from imagen_jax.train.cascade import train_cascade  # heavy imports after flag parsing
      train_cascade(config, FLAGS.workdir, FLAGS.stage)
  except faults.Preempted as e:
    logging.warning("%s Exiting with code %d.", e, faults.EXIT_PREEMPTED)
    sys.exit(faults.EXIT_PREEMPTED)
  if FLAGS.stage is None and "eval" in config and config.eval.after_training:
    if multihost:
      logging.info("Several hosts: config.eval.after_training skipped. To evaluate, run this "
                   "command on one host without --distributed: the trained stages are loaded, "
                   "not trained again.")
      return
    from imagen_jax.eval.shapes_report import evaluate_workdir
    report = evaluate_workdir(FLAGS.workdir, config.eval, wall_time_start=t0)
    logging.info("Alignment: %s", report)


if __name__ == "__main__":
  host_malloc.reexec()  # tcmalloc when the machine has it: see imagen_jax/host_malloc.py
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
