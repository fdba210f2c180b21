"""dyngen: efficient diffusion transformers (DiT, DiG, DyDiT) in JAX/Flax."""
import setuptools

# Versions are the ones the test suite was run with; ranges stay within the
# minor releases we tested because JAX/Flax/Orbax APIs move between minors.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10,<4.10",
    "array-record>=0.8.6,<0.9",
    "grain>=0.2.18,<0.3",
    "ml-collections>=1.1.0,<1.2",
    "clu>=0.0.12,<0.1",
    "einops>=0.8.2,<0.9",
    "numpy>=2.4,<2.5",
    "ml-dtypes>=0.6,<0.7",  # bfloat16 tensors in PyTorch checkpoints (already a jax dependency).
    # tfds needs it to build datasets whose builder lives inside a package (digits, folder).
    "importlib-resources>=7.1,<8",
    # clu's metric writers import tensorflow and tensorboard.
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
    "pillow>=13.0,<14",
    # The embedded quickstart dataset (8x8 digits) ships inside scikit-learn.
    "scikit-learn>=1.9.1,<1.10",
    "safetensors>=0.8,<0.9",  # SD-VAE weights in the diffusers layout (numpy API, no torch).
    "diffrax>=0.7.2,<0.8",  # dopri5 of the flow-matching ODE sampler.
]

setuptools.setup(
    name="dyngen",
    version="0.1.0",
    description="Efficient diffusion transformers (DiT, DiG, DyDiT) in JAX/Flax, TPU-first.",
    # The experiment configs stay in the repository's configs/ and install as dyngen.configs, so that a config
    # loads by name after `pip install` (dyngen.configs.get("dit_xl", "XL/2")).
    packages=setuptools.find_packages(include=["dyngen", "dyngen.*"]) + ["dyngen.configs"],
    package_dir={"dyngen.configs": "configs"},
    # The C++ kernels are compiled on the host that first runs them (dyngen/cpu_kernels/build.py).
    package_data={"dyngen.cpu_kernels": ["*.cc"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # nbclient, nbformat and ipykernel execute launch/colab.ipynb headless (tests/test_colab_notebook.py).
        "test": ["pytest>=9.2,<10", "pytest-xdist>=3.8,<4", "nbclient>=0.11,<0.12", "nbformat>=5.11,<5.12",
                 "ipykernel>=7.4,<8"],
    },
)
