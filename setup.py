from setuptools import find_packages, setup

# torch/torchvision are pinned to the releases the project is tested with
# (see README "Install"); the DALI wheel is the CUDA-12 build, which also runs CPU-only.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
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
]

setup(
    name="ffn-dist",
    version="0.1.0",
    description="Distributed Feature Fusion Network (FFN) for long-tailed recognition",
    python_requires=">=3.10",
    packages=find_packages(include=["ffn_dist", "ffn_dist.*", "launchers"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": ["pytest>=8", "ruff>=0.6"]},
    entry_points={"console_scripts": ["ffn=ffn_dist.cli:main"]},
)
