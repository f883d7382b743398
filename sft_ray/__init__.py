"""sft-ray: generate supervised-fine-tuning demonstrations at scale with Ray.

Importing this package is cheap on purpose: Ray, vLLM and torch are imported
only by the code paths that need them, so ``sft-ray --help`` stays instant.
"""

__version__ = "0.1.0"
