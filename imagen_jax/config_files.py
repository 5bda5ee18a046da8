"""Config files that build on one another (configs/imagen_*.py).

Config files are loaded by path (ml_collections' --config=FILE), not as a package, so one
imports another by path too.
"""
import importlib.util
import os


def load_sibling(this_file: str, name: str):
  """The module configs/<name>.py next to `this_file`, imported by path."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"imagen_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
