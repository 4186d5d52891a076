"""mmalign: align generative models with preferences across modalities."""

__version__ = "0.1.0"
