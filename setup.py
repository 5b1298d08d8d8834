"""Installable package: deep generative models (VAE, KVAE, HRSSM) written in Pyro."""
from setuptools import find_packages, setup

setup(
    name="pyro-dgm",
    version="0.1.0",
    description="Deep generative models in idiomatic Pyro: VAE family, Kalman VAE, HRSSM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyro_models", "pyro_models.*", "inference", "inference.*"]),
    python_requires=">=3.9",
    # Ranges here; the exact versions tested live in constraints.txt.
    install_requires=[
        "torch>=2.1,<2.14",
        "pyro-ppl>=1.9,<1.10",
        "numpy>=1.24",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # The API reference and the tutorials: `make test` installs it, so CI builds the docs (warnings as
        # errors) and executes the notebooks (nbval); a user who only trains never needs it.
        "docs": ["sphinx>=7", "myst-nb>=1.0", "nbval>=0.10", "ipykernel>=6"],
        # torchvision is optional: only the MNIST downloader can use it; the library reads IDX itself.
        "vision": ["torchvision"],
        # TensorBoard is optional: --tensorboard logs runs to RUN/tensorboard (inference/runs/tensorboard.py).
        "tensorboard": ["tensorboard"],
    },
)
