"""refq's version (a leaf: written into every checkpoint and golden manifest)."""
__version__ = "0.1.0"
