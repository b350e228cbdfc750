"""The base of every method's schema: the keys all methods share, and the facts about a method
that the config layer (and the layers below the methods) read.

Each method's own schema subclasses MethodConfig in the method's module (ftune/methods/<name>.py)
and registers itself there; configs/method/<file>.yaml names it in its defaults list
(`/schema/method/<name>`). The facts are class variables, not config keys: they say what the
method is, not what the user chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import MISSING


@dataclass
class MethodConfig:
    """What is trained. Subclasses in ftune/methods/ are the method group's choices."""

    name: str = MISSING
    """The method's registry name (full, freeze, lora, qlora, …)."""

    no_packing: ClassVar[str] = ""
    """Why rows cannot be packed with this method ("": they can)."""
    adapter_reference: ClassVar[bool] = False
    """The trained model runs with the method switched off, which gives DPO and PPO their reference
    model for free (peft's disable_adapter)."""
    trains_base: ClassVar[bool] = False
    """Base weights are trained, so they load in fp32 (AdamW on bf16 weights loses small updates)."""
    saves_full_model: ClassVar[bool] = False
    """The saved output is a complete model folder, not an adapter on the base."""
    one_process: ClassVar[str] = ""
    """Why the method trains in one process only ("": it runs in several)."""
    base_quantization: ClassVar[str] = ""
    """The model.quantization the method implies when none is set ("": none)."""
    trains_every_weight: ClassVar[bool] = False
    """Every parameter of the model is trained (the memory estimate keeps no frozen weights)."""
    quantised_variant: ClassVar[str] = ""
    """The same method on a 4-bit base, which `ftune plan` suggests when memory is short ("": none)."""
    counted_as: ClassVar[str] = ""
    """A method with the same trainable parameters on an unquantised base, which the memory estimate
    builds on an empty (meta) model when this one cannot be built there ("": this one)."""

    def problems(self, cfg: Any) -> list[str]:
        """This method's own validation rules, as "method.key: what is wrong (got X); the fix"."""
        return []

    def output_name(self) -> str:
        """The run directory's folder that holds what was trained."""
        return "model" if self.saves_full_model else "adapter"
