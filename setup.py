import re
from pathlib import Path

from setuptools import find_packages, setup

# The version lives in one place: ffn_dist/__init__.py (what `ffn --version` prints).
VERSION = re.search(
    r'__version__ = "([^"]+)"', Path(__file__).with_name("ffn_dist").joinpath("__init__.py").read_text()
)[1]

# The ranges the code supports: torch 2.11 (the stock CUDA images; CI runs the
# version-dependent tests on it, scripts/constraints-lower.txt) through 2.15 (the suite passed
# on 2.15.0 with torchvision 0.29.2); scripts/constraints.txt pins the release CI runs.
# The DALI wheel is the CUDA-12 build, which also runs CPU-only.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.16",
    "torchvision>=0.26,<0.30",
    "nvidia-dali-cuda120>=2.4",
    "deepspeed>=0.19",
    "submitit>=1.5",
    "pyyaml>=6",
    "tensorboard>=2.14",
    "numpy>=1.24",
    "pillow>=10",
    "scikit-learn>=1.3",  # ships the handwritten digits behind the built-in dataset
    "tqdm>=4.66",
    "safetensors>=0.4",  # feature-cache shards: no pickle, memory-mappable
    "matplotlib>=3.7",  # sweep and per-class plots
    "onnx>=1.17",  # `ffn export`: the model as one ONNX graph (torch's exporter needs onnxscript)
    "onnxscript>=0.5",
    "onnxruntime>=1.20",  # `ffn predict --runtime onnx`, and what users serve the export with
]

setup(
    name="ffn-dist",
    version=VERSION,
    license="Apache-2.0",
    description="Distributed Feature Fusion Network (FFN) for long-tailed recognition",
    python_requires=">=3.10",
    # launchers/ and configs/ stay at the top of the repository and install inside the package.
    packages=[*find_packages(include=["ffn_dist", "ffn_dist.*"]), "ffn_dist.launchers", "ffn_dist.configs"],
    package_dir={"ffn_dist.launchers": "launchers", "ffn_dist.configs": "configs"},
    package_data={"ffn_dist.launchers": ["*.sh"], "ffn_dist.configs": ["*.yaml", "studies/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": ["pytest>=8", "ruff>=0.6", "psutil>=5.9", "mkdocs-material>=9.5"]},
    entry_points={"console_scripts": ["ffn=ffn_dist.cli:main"]},
)
