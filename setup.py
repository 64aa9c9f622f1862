from setuptools import find_packages, setup

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
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["cprec=cprec.cli:main"]},
)
