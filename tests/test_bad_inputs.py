"""The bad-input corpus (tests/bad_inputs/cases.yaml) through the real CLI.

Each case must end with ftune's short error panel: non-zero exit, no traceback, one screen, the
key/file/row named, and every file that existed before the command unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CASES = yaml.safe_load((Path(__file__).parent / "bad_inputs" / "cases.yaml").read_text())
SCREEN_LINES = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A finished tiny run (outputs/done, with checkpoints) and a tiny model without an EOS token."""
    from ftune.config.compose import compose
    from ftune.train.run import train

    root = tmp_path_factory.mktemp("bad-inputs")
    out = root / "outputs"
    overrides = [*tiny_args(tiny_model_dir), f"train.output_dir={out}", "train.run_name=done", "train.max_steps=2",
                 "train.save_every=1", "train.sample_max_new_tokens=0"]
    train(compose(overrides))
    noeos = root / "noeos"
    shutil.copytree(tiny_model_dir, noeos)
    config = json.loads((noeos / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    config.pop("pad_token", None)
    (noeos / "tokenizer_config.json").write_text(json.dumps(config))
    return {"out": out, "run": out / "done", "noeos": noeos, "tiny": tiny_model_dir}


def tiny_args(model: Path) -> list[str]:
    return [f"model.path={model}", "model.name=tiny", "hardware.precision=fp32", "train.tensorboard=false",
            "dataset.max_rows=16", "train.micro_batch_size=4", "train.eval_every=0", "dataset.max_seq_len=128"]


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_corpus_is_large_and_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert all(c.get("expect") and c.get("args") for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_gets_a_short_clear_error(case, world, tmp_path):
    for name, content in (case.get("files") or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    copy = tmp_path / "copy-of-run"
    if case.get("damage"):
        shutil.copytree(world["run"], copy)
        for rel in case["damage"]:
            data = (copy / rel).read_bytes()
            (copy / rel).write_bytes(data[: len(data) // 2])
    values = {"tiny": str(world["tiny"]), "noeos": str(world["noeos"]), "run": str(world["run"]),
              "copy": str(copy), "out": str(world["out"])}
    args = [a.format(**values) if "{" in a and not a.startswith("dataset.sources") else a for a in case["args"]]
    if case.get("tiny"):
        args += [a for a in tiny_args(world["tiny"]) if a.split("=")[0] not in {x.split("=")[0] for x in args}]
        if not any(a.startswith("train.output_dir=") for a in args):
            args.append(f"train.output_dir={tmp_path / 'outputs'}")
    before = snapshot(world["out"], tmp_path)
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run([sys.executable, "-m", "ftune.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    output = result.stdout + result.stderr
    print(output)  # shown with -rP: the corpus doubles as a gallery of error messages
    flat = re.sub(r"[\s│╭╮╰╯─]+", " ", output).lower()
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert "ftune: error" in output, output  # the short panel, not the unexpected-error one
    assert len(result.stderr.splitlines()) <= SCREEN_LINES, output
    for text in case["expect"]:
        assert re.sub(r"\s+", " ", text.lower()) in flat, f"{text!r} not in:\n{output}"
    after = snapshot(world["out"], tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed was changed"
    assert not [k for k in after if k not in before and "/outputs/" in k and str(world["out"]) in k], \
        "files appeared in the finished run's folder"
