"""Keep library chatter (download bars, deprecation notes, optional-kernel notices) off the screen,
so ftune's own progress bar and messages are what the user reads."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes reports a missing optional CPU kernel package at import; its fallback works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    # AdaLoRA legitimately prunes some matrices to rank 0; peft mistakes those for unsharded tensors.
    warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    # lm-eval (ftune eval benchmarks) logs every task it builds; datasets draws a bar per split.
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
