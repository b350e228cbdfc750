"""Memory preflight: will the composed recipe fit, before anything loads? (`ftune plan`, and the
check `ftune train` runs first.) shape.py reads the model's shape and the trained parameters,
estimate.py holds the formulas and their calibration, advice.py what they lead to."""

from ftune.plan.advice import checkpoint_note, knobs, preflight, render, resolve_checkpointing
from ftune.plan.estimate import (
    AUTO_HEADROOM,
    CPU_RUNTIME,
    CPU_VARIABLE_SHAPE_FRAGMENTATION,
    GIB,
    Estimate,
    checkpoint_mode,
    estimate,
    fixed_checkpointed_layers,
    heap_fragmentation,
)
from ftune.plan.shape import Shape, model_shape, shape_from_config, trainable_params

__all__ = ["AUTO_HEADROOM", "CPU_RUNTIME", "CPU_VARIABLE_SHAPE_FRAGMENTATION", "GIB", "Estimate", "Shape",
           "checkpoint_mode", "checkpoint_note", "estimate", "fixed_checkpointed_layers", "heap_fragmentation",
           "knobs", "model_shape", "preflight", "render", "resolve_checkpointing", "shape_from_config",
           "trainable_params"]
