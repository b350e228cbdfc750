"""Derive the shipped preference set data/smol-prefs.jsonl from data/smol-instruct.jsonl, and
the unpaired feedback set data/smol-feedback.jsonl (for KTO) from the pairs.

    python scripts/make_preferences.py

Each row: prompt (the instruction, with its input), chosen (the correct answer) and rejected (a
wrong answer in the same style: the last number changed when the answer has one, otherwise the
answer to a different instruction). Deterministic (fixed seed), stdlib only.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "data" / "smol-instruct.jsonl"
TARGET = ROOT / "data" / "smol-prefs.jsonl"
FEEDBACK = ROOT / "data" / "smol-feedback.jsonl"


def wrong_answer(answer: str, others: list[str], rng: random.Random) -> str:
    numbers = list(re.finditer(r"\d+", answer))
    if numbers:
        last = numbers[-1]
        changed = int(last.group()) + rng.randint(1, 9) * rng.choice([-1, 1])
        if changed < 0:
            changed = int(last.group()) + rng.randint(1, 9)
        return answer[: last.start()] + str(changed) + answer[last.end():]
    while True:
        other = rng.choice(others)
        if other != answer:
            return other


def main() -> None:
    rng = random.Random(1234)
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    answers = [r["output"] for r in rows]
    out = []
    for r in rows:
        prompt = f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]
        out.append({"prompt": prompt, "chosen": r["output"], "rejected": wrong_answer(r["output"], answers, rng)})
    TARGET.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out))
    print(f"{TARGET}: {len(out)} rows")
    # Unpaired: each prompt keeps one of its answers (chosen or rejected, seeded), labelled.
    feedback = []
    for row in out:
        good = rng.random() < 0.5
        feedback.append({"prompt": row["prompt"], "completion": row["chosen" if good else "rejected"], "label": good})
    FEEDBACK.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in feedback))
    print(f"{FEEDBACK}: {len(feedback)} rows ({sum(r['label'] for r in feedback)} desirable)")


if __name__ == "__main__":
    main()
