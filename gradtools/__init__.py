"""gradtools: fine-tuning tools for PyTorch.

Public API only; each tool lives in its own module.
"""

__all__: list[str] = []
