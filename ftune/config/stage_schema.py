"""The base of every stage's schema: the facts about a stage that the config layer (and data)
read. Each stage's schema subclasses StageConfig in its own module (ftune/train/objectives/) and
registers there with its objective and loop hooks; configs/stage/<name>.yaml names it
(`/schema/stage/<name>`). The facts are class variables, not keys the user sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import MISSING


@dataclass
class StageConfig:
    """The training objective. Subclasses in ftune/train/objectives/ are the stage group's choices."""

    name: str = MISSING
    """pt (continue-pretraining on raw text) | sft (supervised fine-tuning on prompts/answers) |
    dpo | rm | ppo."""

    formats: ClassVar[tuple[str, ...]] = ()
    """The dataset formats the stage trains on."""
    whole_rows: ClassVar[str] = ""
    """Why the stage cannot pack or share rows ("": it can)."""
    prompts_only: ClassVar[bool] = False
    """Rows are tokenised as prompts alone (the stage generates the answers)."""
    train_on: ClassVar[str] = ""
    """The dataset.train_on the stage implies ("": the user's)."""
    answers: ClassVar[bool] = True
    """The trained model answers prompts (false: it scores them, a reward model), so a sample
    answer and generation-based evaluation mean something."""
    one_process: ClassVar[str] = ""
    """Why the stage trains in one process only ("": it runs in several)."""
    token_loss: ClassVar[bool] = False
    """The held-out loss is a per-token cross-entropy (a perplexity), so any model can be evaluated
    on it without a run (`ftune eval model=…`)."""
    rewarded: ClassVar[bool] = False
    """Answers are scored by the stage's reward (stage.reward), which is its held-out measure."""
    base_comparable: ClassVar[bool] = True
    """The starting model's figures mean something beside the trained one's (false: a reward head
    starts untrained, DPO's base is its own reference)."""
    scalar_head: ClassVar[str] = ""
    """The scalar head the stage trains beside the method and saves with it (reward | value; "": none)."""

    def problems(self, cfg: Any) -> list[str]:
        """This stage's own validation rules, as "stage.key: what is wrong (got X); the fix"."""
        return []
