"""The learned test-bed: a small diffusers Wan video DiT trained on procedural videos (see `model`, `data`, `train`)."""

from .data import NUM_CLASSES, class_embeddings, class_name, make_batch, null_embedding
from .model import (
    LATENT_SHAPE,
    TESTBED_CONFIG,
    build_testbed,
    count_params,
    example_inputs,
    example_target,
    grid,
    psnr,
    sample,
    shifted_sigmas,
)

__all__ = [
    "LATENT_SHAPE",
    "NUM_CLASSES",
    "TESTBED_CONFIG",
    "build_testbed",
    "class_embeddings",
    "class_name",
    "count_params",
    "example_inputs",
    "example_target",
    "grid",
    "make_batch",
    "null_embedding",
    "psnr",
    "sample",
    "shifted_sigmas",
]
