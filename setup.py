import glob
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# the top-level files the library reads (cprec/resources.py): copied into the package when it is built, so a
# wheel carries them; users keep finding and editing them at the top of the repository
SHIPPED_PATTERNS = ("ds_configs/*.json", "launch/configs/*.yaml")


class BuildPyWithShippedFiles(build_py):
    def run(self):
        super().run()
        for pattern in SHIPPED_PATTERNS:
            for source in sorted(glob.glob(pattern)):
                target = Path(self.build_lib) / "cprec" / "_shipped" / source
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


setup(
    name="cprec",
    version="0.1.0",
    description="All-domain continual pre-training of LLMs for recommendation (CPRec, arXiv 2504.08949)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cprec", "cprec.*"]),
    install_requires=[
        # torch is pinned by the install commands (CPU build here, CUDA build on clusters); any 2.4+ works
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=5.24,<6",  # the `cache` keyword of model calls (5.x); tested with 5.24
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "zstandard>=0.22",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "pyarrow>=15",
        "gguf>=0.10",  # reads the SmolLM2 backbone shipped as GGUF
        "accelerate>=1.0",
        "safetensors>=0.4",
        "matplotlib>=3.8",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "liger": ["liger-kernel>=0.5"],  # model.kernels: liger (cprec/kernels.py; needs CUDA and Triton)
        "test": ["pytest>=8", "pytest-xdist>=3.5"],  # the suite runs on every core (-n auto; pyproject.toml)
        "wandb": ["wandb>=0.17"],  # `wandb:` in the training config (cprec/tracking.py)
    },
    entry_points={"console_scripts": ["cprec=cprec.cli:main"]},
    cmdclass={"build_py": BuildPyWithShippedFiles},
)
