"""Imports imagen-pytorch's `imagen_pytorch.imagen_pytorch` module with no network.

Pure PyTorch (no JAX): the benchmark peers run it inside their own virtual environment,
and tests/test_diffusion.py uses it for the formula parity tests.

Install imagen-pytorch without its dependencies, which would replace a CPU torch with a
CUDA one and add torchvision, datasets, accelerate, ...:
  pip install --no-deps imagen-pytorch==2.1.0 beartype kornia kornia-rs
(einops, transformers, tqdm and torch are the other imports it needs). Three obstacles,
three workarounds, all undone or confined to this import:
- the package __init__ imports the trainer (accelerate, ema-pytorch, datasets, ...): an
  empty package object with the real __path__ stands in, so only the submodules we
  import run;
- `Unet.__init__` has `text_embed_dim = get_encoded_dim('google/t5-v1_1-base')` as a
  default argument, evaluated at import, which asks the Hugging Face hub for the T5
  config: the config (d_model 768, the only field read) goes into imagen-pytorch's own
  cache `t5.T5_CONFIGS` first, so it never looks;
- `import torchvision.transforms` (only used to make PIL images): when torchvision is
  absent, a stub is importable just while the module imports.
"""
import importlib
import importlib.util
import sys
import types
import warnings


def load_imagen_pytorch():
  if "imagen_pytorch.imagen_pytorch" in sys.modules:
    return sys.modules["imagen_pytorch.imagen_pytorch"]
  import transformers
  spec = importlib.util.find_spec("imagen_pytorch")
  if spec is None:
    raise ImportError("imagen-pytorch is not installed: pip install --no-deps "
                      "imagen-pytorch==2.1.0 beartype kornia kornia-rs")
  if "imagen_pytorch" not in sys.modules:
    package = types.ModuleType("imagen_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["imagen_pytorch"] = package
  t5 = importlib.import_module("imagen_pytorch.t5")
  t5.T5_CONFIGS.setdefault(t5.DEFAULT_T5_NAME, {"config": transformers.T5Config(d_model=768)})
  stubs = {}
  if importlib.util.find_spec("torchvision") is None:
    stubs = {"torchvision": types.ModuleType("torchvision"),
             "torchvision.transforms": types.ModuleType("torchvision.transforms")}
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
  sys.modules.update(stubs)
  try:
    with warnings.catch_warnings():  # torch deprecates the torch.jit.script it decorates with
      warnings.simplefilter("ignore", DeprecationWarning)
      return importlib.import_module("imagen_pytorch.imagen_pytorch")
  finally:
    for name in stubs:  # transformers' find_spec checks would trip over a spec-less stub
      sys.modules.pop(name, None)
