"""sicot: SKU-level product recognition with side-information co-training (SICoT)."""

__version__ = "0.1.0"
