"""CPRec: all-domain continual pre-training of LLMs for recommendation (arXiv 2504.08949)."""

__version__ = "0.1.0"
