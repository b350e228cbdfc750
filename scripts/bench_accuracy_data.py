"""The held-out structured-extraction task of the accuracy benchmark (scripts/bench_accuracy.py),
built from real records available offline: the METADATA of the Python distributions installed on
this machine (the project's venv first, then other Python installations found by path).

Each prompt holds a chunk of one distribution's METADATA text (its header lines, some of the
repeated ones — Classifier, Requires-Dist, Project-URL, ... — left out to fit the chunk's token
budget, sometimes followed by the first lines of the description) and asks for a few fields as a
JSON object. The answer is the fields' literal header values, null where the header line is absent
(a required line is never dropped from the chunk, so null always means "not in the text").

Distributions are split by a hash of their name into train and test: no distribution has prompts
on both sides. Several prompts per distribution (different field sets, different chunks).

    .venv/bin/python scripts/bench_accuracy_data.py --out bench/accuracy_data
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata as md
import json
import random
import sys
from pathlib import Path

from bench_workload import Settings, compose_arm, model_folder

# (answer key, METADATA header) of every field a task can ask for.
FIELDS = {"name": "Name", "version": "Version", "summary": "Summary", "requires_python": "Requires-Python",
          "author_email": "Author-email", "license_expression": "License-Expression"}
TASKS = [
    ("name", "version", "requires_python"),
    ("name", "version", "summary"),
    ("name", "author_email", "requires_python"),
    ("name", "version", "license_expression"),
    ("name", "version", "requires_python", "author_email", "summary"),
]
TEST_FRACTION = 0.42  # of the distributions (by name hash)
CHUNK_TOKENS = (110, 180)  # the metadata chunk's token budget, drawn per prompt
MAX_ANSWER_TOKENS = 96  # longer answers (long author lists) are left out: they set the generation length


def site_dirs() -> list[str]:
    """The venv's own site-packages first, then other installations on this machine (more
    distinct distributions; a name seen earlier wins)."""

    own = [p for p in sys.path if p.endswith("site-packages")]
    others = sorted(glob.glob("/root/.pyenv/versions/*/lib/python3*/site-packages")
                    + glob.glob("/usr/lib/python3/dist-packages") + glob.glob("/usr/local/lib/python3*/dist-packages")
                    + glob.glob("/usr/lib/google-cloud-sdk/platform/bundledpythonunix/lib/python3*/site-packages"))
    vendored = [f"{p}/setuptools/_vendor" for p in own + others]
    return list(dict.fromkeys(own + others + vendored))


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def distributions() -> dict[str, str]:
    """normalised name -> METADATA text, one per distinct distribution."""
    out: dict[str, str] = {}
    for path in site_dirs():
        if not Path(path).is_dir():
            continue
        for dist in md.distributions(path=[path]):
            text = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
            name = dist.metadata["Name"] if text else None
            if name and norm(name) not in out:
                out[norm(name)] = text.replace("\r\n", "\n")
    return dict(sorted(out.items()))


def header_groups(text: str) -> tuple[list[tuple[str, str]], str]:
    """([(key, text of the line and its continuation lines)], body)."""
    head, _, body = text.partition("\n\n")
    groups: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and groups:
            key, block = groups[-1]
            groups[-1] = (key, block + "\n" + line)
        elif ":" in line:
            groups.append((line.split(":", 1)[0], line))
    return groups, body


def field_value(groups: list[tuple[str, str]], header: str) -> tuple[bool, str | None]:
    """(usable, value): the header's literal value; not usable when it spans several lines or repeats."""
    found = [block for key, block in groups if key.lower() == header.lower()]
    if not found:
        return True, None
    if len(found) > 1 or "\n" in found[0]:
        return False, None
    value = found[0].split(":", 1)[1].strip()
    return (bool(value), value or None)


def instruction(keys: tuple[str, ...]) -> str:
    names = ", ".join(f"{k} ({FIELDS[k]})" for k in keys)
    return ("Extract fields from this Python package metadata. Answer with one JSON object with exactly "
            f"these keys, in this order: {names}. Copy each value exactly as written; use null for a field "
            "whose line is not in the text.")


def make_chunk(groups: list[tuple[str, str]], body: str, keep: set[str], budget: int, rng: random.Random,
               count) -> str:
    """Header lines in their order: every required one, then optional ones dropped at random until
    the chunk fits `budget` tokens; then, if room is left, a few lines of the description."""
    required = [i for i, (key, _) in enumerate(groups) if key.lower() in keep]
    optional = [i for i in range(len(groups)) if i not in required]
    chosen = set(required) | {i for i in optional if rng.random() < 0.6}
    while True:
        text = "\n".join(groups[i][1] for i in sorted(chosen))
        droppable = sorted(chosen - set(required))
        if count(text) <= budget or not droppable:
            break
        chosen.discard(rng.choice(droppable))
    room = budget - count(text)
    lines = [ln for ln in body.split("\n") if ln.strip()][:8]
    if room > 30 and lines and rng.random() < 0.5:
        extra = ""
        for ln in lines:
            if count(extra + ln) > room:
                break
            extra += ln + "\n"
        if extra:
            text += "\n\n" + extra.rstrip("\n")
    return text


def build(tokenizer_path: str, seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)

    def count(s: str) -> int:
        return len(tok(s, add_special_tokens=False)["input_ids"])

    train, test, dists = [], [], {"train": [], "test": []}
    for name, text in distributions().items():
        side = "test" if int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32 < TEST_FRACTION else "train"
        groups, body = header_groups(text)
        values = {k: field_value(groups, h) for k, h in FIELDS.items()}
        if not values["name"][1] or not values["version"][1]:
            continue
        made = 0
        for t, keys in enumerate(TASKS):
            if not all(values[k][0] for k in keys):
                continue  # a multi-line or repeated field: no exact literal answer
            rng = random.Random(f"{seed}:{name}:{t}")
            keep = {FIELDS[k].lower() for k in keys} | {"name", "version"}
            chunk = make_chunk(groups, body, keep, rng.randint(*CHUNK_TOKENS), rng, count)
            answer = {k: values[k][1] for k in keys}
            if count(json.dumps(answer, ensure_ascii=False)) > MAX_ANSWER_TOKENS:
                continue
            row = {"instruction": instruction(keys), "input": chunk,
                   "output": json.dumps(answer, ensure_ascii=False), "dist": name, "task": t}
            (test if side == "test" else train).append(row)
            made += 1
        if made:
            dists[side].append(name)
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(test)
    return train, test, dists


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench" / "accuracy_data")
    p.add_argument("--tokenizer", default="", help="tokenizer folder (default: ftune's converted SmolLM2)")
    args = p.parse_args()
    path = args.tokenizer
    if not path:

        path = model_folder(compose_arm(Settings(), packed=False))
    train, test, dists = build(path)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(test, args.out / "test.jsonl")
    print(f"{len(train)} train prompts from {len(dists['train'])} distributions, "
          f"{len(test)} test prompts from {len(dists['test'])} distributions -> {args.out}")


if __name__ == "__main__":
    main()
