"""Metric writer: TensorBoard event files (host 0) plus nothing else to configure.

TensorBoard summaries go through tf.summary. On a machine without tensorflow (a GPU box
used only for benchmarks, say) the writer says so once and keeps to the log lines.
"""
from __future__ import annotations

import numpy as np
from absl import logging


class MetricWriter:

  def __init__(self, logdir: str, enabled: bool = True):
    self._tf = self._writer = None
    if not enabled:
      return
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning("tensorflow is not installed: no TensorBoard event files in %s.", logdir)
      return
    self._tf = tf
    self._writer = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default(step=step):
      for name, value in values.items():
        self._tf.summary.scalar(name, float(value))

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self._writer is None:
      return
    with self._writer.as_default(step=step):
      self._tf.summary.image(name, np.asarray(image)[None])

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
