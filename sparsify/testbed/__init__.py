"""The learned test-beds: small diffusers Wan video DiTs trained on procedural videos (see `variants`, `model`, `data`)."""

from .data import NUM_CLASSES, class_embeddings, class_name, make_batch, null_embedding
from .model import (
    LATENT_SHAPE,
    TESTBED_CONFIG,
    build_testbed,
    build_testbed16k,
    count_params,
    example_inputs,
    example_target,
    grid,
    psnr,
    sample,
    shifted_sigmas,
)
from .variants import LATENT_SHAPE_16K, TESTBED16K_CONFIG, VARIANTS, get_variant

__all__ = [
    "LATENT_SHAPE",
    "LATENT_SHAPE_16K",
    "NUM_CLASSES",
    "TESTBED16K_CONFIG",
    "TESTBED_CONFIG",
    "VARIANTS",
    "build_testbed",
    "build_testbed16k",
    "class_embeddings",
    "class_name",
    "count_params",
    "example_inputs",
    "example_target",
    "get_variant",
    "grid",
    "make_batch",
    "null_embedding",
    "psnr",
    "sample",
    "shifted_sigmas",
]
