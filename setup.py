"""Installs the mixed-precision training engine and its command-line entry point."""

from setuptools import find_packages, setup

setup(
    name="mixed-precision-engine",
    version="0.1.0",
    description="A hand-written TF2 mixed-precision training loop with dynamic loss scaling.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "models*", "input_pipeline*"]),
    py_modules=["main"],
    install_requires=[
        "tensorflow>=2.16,<2.22",  # ships Keras 3; tested on 2.21
        "keras>=3.3",
        "absl-py>=2.0",
        # importlib_resources: TFDS 4.9.x on Python 3.11 needs it to prepare data sets.
        "tensorflow-datasets>=4.9.3",
        "importlib_resources>=6.0",
        "tensorboard>=2.16",
        "numpy>=1.26",
        "pillow>=10.0",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6", "pytest-timeout>=2.3", "pytest-xdist>=3.5"],
    },
    entry_points={"console_scripts": ["mixed-precision-train=main:run_main"]},
)
