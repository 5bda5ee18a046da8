"""What the T5 checkpoint readers share: local-or-remote paths and lazily read arrays.

A reader returns the encoder's parameters as a tree in T5X layout whose leaves are
`LazyArray`s (or plain numpy arrays), so that nothing big is read before the loader knows
where each array goes: on a mesh, each host reads only the slices its devices hold.

Remote paths (`gs://...`) go through `tf.io.gfile`, imported only when one is used:
importing tensorflow costs seconds that local loads should not pay.
"""
from __future__ import annotations

import os
import posixpath
import shutil
from typing import Callable, Sequence

import numpy as np


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


def join(path: str, *parts: str) -> str:
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
  return sorted(name.rstrip("/") for name in names)


def open_file(path: str, mode: str = "rb"):
  return _gfile().GFile(path, mode) if is_remote(path) else open(path, mode)


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def copy(src: str, dst: str) -> None:
  if is_remote(src) or is_remote(dst):
    _gfile().copy(src, dst, overwrite=True)
  else:
    shutil.copyfile(src, dst)


def describe_dir(path: str, limit: int = 12) -> str:
  """A short listing of a directory for error messages."""
  try:
    names = listdir(path)
  except Exception:  # pylint: disable=broad-except
    return "(unreadable)"
  shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
  return f"[{shown}]" if names else "(empty)"


def full_index(ndim: int) -> tuple[slice, ...]:
  return (slice(None),) * ndim


class LazyArray:
  """An array of a checkpoint that has not been read yet.

  `read(index)` returns the numpy array at a tuple of slices (one per dimension); a
  source that can only read whole tensors reads once and slices (see `whole`), and
  `release()` drops that copy once the loader has placed the array.
  """

  def __init__(self, shape: Sequence[int], dtype, read: Callable[[tuple], np.ndarray],
               source: str, release: Callable[[], None] | None = None):
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)
    self.source = source
    self._read = read
    self._release = release

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    out = np.asarray(self._read(index + full_index(self.ndim - len(index))))
    if out.dtype != self.dtype:
      raise ValueError(f"{self.source}: read {out.dtype}, its metadata says {self.dtype}")
    return out

  def __array__(self, dtype=None, copy=None):  # pylint: disable=redefined-outer-name
    out = self[full_index(self.ndim)]
    return out if dtype is None else out.astype(dtype)

  def release(self) -> None:
    if self._release is not None:
      self._release()

  @property
  def T(self) -> "LazyArray":  # pylint: disable=invalid-name
    """The transpose of a 2-D array, still unread (HF Linear [out, in] -> kernel [in, out])."""
    if self.ndim != 2:
      raise ValueError(f"{self.source}: transpose of a {self.ndim}-D array")
    return LazyArray(self.shape[::-1], self.dtype, lambda index: self._read(index[::-1]).T,
                     self.source + " (transposed)", self._release)

  @classmethod
  def whole(cls, shape, dtype, load: Callable[[], np.ndarray], source: str) -> "LazyArray":
    """For sources that read whole tensors only: `load` runs once, slices are views."""
    cache = []

    def read(index):
      if not cache:
        cache.append(load())
      return cache[0][index]

    return cls(shape, dtype, read, source, release=cache.clear)

  def __repr__(self) -> str:
    return f"LazyArray({self.shape}, {self.dtype}, {self.source})"
