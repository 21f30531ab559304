"""sparsify: calibrated block-sparse attention for video Diffusion Transformers."""

__version__ = "0.1.0"
