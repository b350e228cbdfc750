"""Gradient checkpointing on all, some or none of the decoder layers (train.gradient_checkpointing).

A recomputed layer keeps only its input during the forward pass and runs its forward again in the
backward pass: its activation memory drops to one [tokens x hidden] tensor at the price of about
one more forward of that layer. `auto` recomputes only as many layers as the memory estimate needs
(ftune/plan/, resolve_checkpointing), so a run that fits pays nothing and one that nearly fits
pays for a few layers instead of all of them.
"""

from __future__ import annotations

from typing import Any

from ftune import plan
from ftune.errors import FtuneError
from ftune.runtime import decoder_layers

EVERY = 1 << 30  # "every layer" before the model is loaded: more than any model has


def layers_for_run(cfg: Any) -> tuple[int, str | None]:
    """(decoder layers to recompute, a note for the user), decided before the model loads (the
    estimate counts the weights; the device's free memory must not have lost them already)."""
    fixed = plan.fixed_checkpointed_layers(cfg.train.gradient_checkpointing, EVERY)
    if fixed is not None:  # true: EVERY, clamped to the model's layers by restrict()
        return fixed, None
    try:
        shape = plan.model_shape(cfg)
        layers, est = plan.resolve_checkpointing(cfg, shape)
    except FtuneError as exc:
        return 0, f"train.gradient_checkpointing=auto: off (no memory estimate: {exc.title})"
    if not layers:
        return 0, None
    return layers, (f"train.gradient_checkpointing=auto: {plan.checkpoint_note(layers, shape.layers)} "
                    f"(estimated {est.total / plan.GIB:.1f} GiB of {est.available / plan.GIB:.1f} GiB)")


def enable(model: Any, layers: int) -> None:
    """Turn checkpointing on for the model (before the method wraps it: quantised bases and peft
    prepare their inputs for it); restrict() then picks the layers."""
    if not layers:
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def restrict(model: Any, layers: int) -> int:
    """Recompute only the first `layers` decoder layers (at most all); returns how many recompute.

    transformers reads a per-layer `gradient_checkpointing` flag at every call, so the others run
    their plain forward and keep their activations."""
    if not layers:
        return 0
    blocks = decoder_layers(model)
    keep = min(layers, len(blocks))
    if not any(hasattr(b, "gradient_checkpointing") for b in blocks):
        return len(blocks)  # a model that checkpoints at the model level: all layers, as enable() set it
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i < keep
    return keep
