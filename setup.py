"""imagen-jax: Imagen (cascaded text-to-image diffusion) in JAX/Flax."""
import setuptools

# Pinned, known-good versions (see README). Bump them together, after the test suite passes.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "tensorflow==2.21.0",  # seqio needs tensorflow_text, which needs the full tensorflow
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "seqio==0.0.20",
    "tensorboard",  # tf.summary (TensorBoard event files)
    "sentencepiece",
    "tensorstore",
    "importlib_resources",  # tensorflow-datasets needs it through etils
    "msgpack",
    "numpy",
    "pillow",
    "tqdm",
]

EXTRAS_REQUIRE = {
    # TPU VMs: jax with libtpu, same jax version as above.
    "tpu": ["jax[tpu]==0.10.2"],
    # NVIDIA GPUs (CUDA 12 wheels of the same jax version).
    "cuda": ["jax[cuda12]==0.10.2"],
    # Tests and parity references. torch 2.13.0 is pinned on purpose: an unpinned torch
    # pulls a multi-GB CUDA build; transformers is a reference implementation only.
    # imagen-pytorch itself is installed with --no-deps by the test command (its own
    # requirements pull torchvision and a CUDA torch); these are the parts its diffusion
    # functions import.
    "test": ["pytest", "torch==2.13.0", "transformers", "einops==0.8.2", "beartype==0.23.1",
             "kornia==0.9.0"],
}

setuptools.setup(
    name="imagen_jax",
    version="0.1.0",
    description="Imagen text-to-image cascaded diffusion in JAX/Flax, TPU-native.",
    packages=setuptools.find_packages(include=["imagen_jax", "imagen_jax.*"]),
    package_data={"imagen_jax.text": ["t5_spiece.model", "NOTICE.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
