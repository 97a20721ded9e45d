"""halos-factory: one DeepSpeed trainer core for every human-aware alignment loss."""

__version__ = "0.1.0"
