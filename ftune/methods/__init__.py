"""Methods decide what is trained. Each is one module here that registers a MethodSpec (see
ftune.methods.base); importing this package registers them all.

A method may give the trainer step hooks (AdaLoRA's budget update, DyLoRA's rank sampling) and a
learning-rate scale per parameter (LoRA+).
"""

# Every method module, imported so that each registers its spec (and its schema) once.
from ftune.methods import (  # noqa: F401
    adapters,
    bitfit,
    dylora,
    full,
    longlora,
    lora,
    mixes,
    peft_methods,
    prompts,
    qalora,
)
from ftune.methods.base import (
    SPECS,
    MethodSpec,
    Setup,
    StepHooks,
    apply,
    count_parameters,
    freeze_all,
    hooks_for,
    is_peft,
    register,
    spec_of,
    unwrap_modules,
    wrap_linears,
)

__all__ = ["MethodSpec", "SPECS", "Setup", "StepHooks", "apply", "count_parameters", "freeze_all", "hooks_for",
           "is_peft", "register", "spec_of", "unwrap_modules", "wrap_linears"]
