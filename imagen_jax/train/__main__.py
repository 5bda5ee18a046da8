r"""Trains a cascade: python -m imagen_jax.train --config=configs/FILE.py --workdir=DIR.

  python -m imagen_jax.train --config=configs/shapes.py --workdir=runs/shapes
  python -m imagen_jax.train --config=configs/shapes.py --workdir=runs/shapes --stage=sr \
      --config.stages.sr.train.num_steps=3000

Without --stage every stage trains in order (and, if config.eval.after_training, the
cascade is evaluated at the end); with it, only that stage (what a pod job does). A run
resumes from the latest checkpoint in the workdir.

On SIGTERM the run saves a checkpoint at the next step boundary and exits with code 75
(EX_TEMPFAIL: rerun the same command to resume); a SIGKILLed run resumes from its last
complete checkpoint.
"""
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("stage", None, "Train only this stage (default: all, in order).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  t0 = time.time()
  from imagen_jax.train import faults  # heavy imports after flag parsing
  from imagen_jax.train.cascade import train_cascade

  config = FLAGS.config
  try:
    train_cascade(config, FLAGS.workdir, FLAGS.stage)
  except faults.Preempted as e:
    logging.warning("%s Exiting with code %d.", e, faults.EXIT_PREEMPTED)
    sys.exit(faults.EXIT_PREEMPTED)
  if FLAGS.stage is None and "eval" in config and config.eval.after_training:
    from imagen_jax.eval.shapes_report import evaluate_workdir
    report = evaluate_workdir(FLAGS.workdir, config.eval, wall_time_start=t0)
    logging.info("Alignment: %s", report)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
