"""Fold a trained method into the base weights, where the maths allows it.

Linear updates merge exactly: the LoRA family (LoRA, DoRA, PiSSA, LoHa, LoKr, AdaLoRA), IA3 and
VeRA through peft's merge_and_unload, DyLoRA at its active rank, QA-LoRA into the group
zero-points (the result stays quantised), BitFit trivially (it trained base tensors). Soft prompts add inputs rather than change weights, and bottleneck adapters have a
non-linearity between their projections: those are refused with the reason.
"""

from __future__ import annotations

from typing import Any

import torch

from ftune.errors import FtuneError
from ftune.methods import is_peft, unwrap_modules

NOT_MERGEABLE = {
    "prompt": "prompt tuning adds virtual input tokens; there is no weight change to fold in",
    "ptuning": "p-tuning adds virtual input tokens; there is no weight change to fold in",
    "prefix": "prefix tuning adds key/value prefixes to every layer; there is no weight change to fold in",
    "ptuning-v2": "p-tuning v2 adds key/value prefixes to every layer; there is no weight change to fold in",
    "adapter": "bottleneck adapters apply a non-linearity between their projections, so they are not a "
               "linear change of any base weight",
}


def merge(model: Any, method_name: str) -> Any:
    """A plain transformers model with the method folded in (the input model is modified)."""
    if method_name in NOT_MERGEABLE:
        raise FtuneError(f"method={method_name} cannot be merged: {NOT_MERGEABLE[method_name]}",
                         hint="Use the adapter as it is (peft loads it), or train a LoRA-family method to merge.")
    if is_peft(model):
        return model.merge_and_unload()
    if method_name == "dylora":
        return merge_dylora(model)
    if method_name == "qalora":
        from ftune.methods.qalora import merge_qalora

        return merge_qalora(model)
    return model  # full, freeze, bitfit: the trained tensors already are base tensors


def merge_dylora(model: Any) -> Any:
    from ftune.methods.dylora import DyLoraLinear

    def fold(module: DyLoraLinear) -> torch.nn.Linear:
        with torch.no_grad():
            module.base.weight += module.delta_weight(module.rank).to(module.base.weight.dtype)
        return module.base

    return unwrap_modules(model, DyLoraLinear, fold)
