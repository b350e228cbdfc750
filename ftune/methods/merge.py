"""Fold a trained method into the base weights, where the maths allows it.

Linear updates merge exactly: the LoRA family (LoRA, DoRA, PiSSA, LoHa, LoKr, AdaLoRA), IA3 and
VeRA through peft's merge_and_unload; ftune's own methods through their spec's merge (DyLoRA at its
active rank, QA-LoRA into the group zero-points, so the result stays quantised); methods that
trained base tensors need nothing. A method whose spec gives `not_mergeable` is refused with that
reason.
"""

from __future__ import annotations

from typing import Any

from ftune.errors import FtuneError
from ftune.methods.base import is_peft, spec_of


def merge(model: Any, method: Any) -> Any:
    """A plain transformers model with the method (a method config or name) folded in; the input
    model is modified."""
    spec = spec_of(method)
    if spec.not_mergeable:
        raise FtuneError(f"method={spec.name} cannot be merged: {spec.not_mergeable}",
                         hint="Use the adapter as it is (peft loads it), or train a LoRA-family method to merge.")
    if spec.merge is not None:
        return spec.merge(model)
    if is_peft(model):
        return model.merge_and_unload()
    return model  # the trained tensors already are base tensors (full, freeze, bitfit)
