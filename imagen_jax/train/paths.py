"""Workdir files on a local disk or a bucket (gs://...): what a pod job needs, since all of
its hosts must see one workdir. orbax and tf.summary take either kind of path themselves;
the few other files (config.json, the text encoder's config, sample grids) go through
etils.epath here.
"""
from __future__ import annotations

import os

from etils import epath


def is_url(path: str) -> bool:
  return "://" in str(path)


def absolute(path: str) -> str:
  """An absolute local path, or the URL as it is (os.path.abspath would mangle gs://)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
  epath.Path(path).write_text(text)


def write_bytes(path: str, data: bytes) -> None:
  epath.Path(path).write_bytes(data)


def rename(src: str, dst: str) -> None:
  epath.Path(src).rename(dst)
