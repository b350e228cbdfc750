"""Reading rows from local files and the (offline) Hugging Face cache, and the dataset build with
its on-disk tokenisation cache, held-out split, mixing weights and packing."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from ftune import resources
from ftune.config.schema import DatasetConfig, SourceConfig
from ftune.data import build as build_mod
from ftune.data import formats, sources
from ftune.data.build import build, cache_key
from ftune.data.tokenize import IGNORE
from ftune.errors import FtuneError

ROWS = [
    {"instruction": "Reverse the word.", "input": "hello", "output": "olleh"},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Count letters", "input": "world", "output": "5"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- read_rows
def test_jsonl(tmp_path):
    assert sources.read_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS))) == ROWS


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]))
    assert sources.read_rows(str(path)) == ROWS


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert sources.read_rows(str(path)) == ROWS


def test_json_data_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert sources.read_rows(str(path)) == ROWS


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", ROWS)
    assert sources.read_rows(str(path)) == ROWS


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ROWS)
    assert sources.read_rows(str(path)) == ROWS


def test_csv_with_quotes_commas_and_newlines(tmp_path):
    rows = [{"text": 'a "quoted", multi\nline cell'}, {"text": "plain"}]
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text"])
        writer.writeheader()
        writer.writerows(rows)
    assert sources.read_rows(str(path)) == rows


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert sources.read_rows(str(path)) == ROWS


def test_parquet_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    read = sources.read_rows(str(path))
    assert read == rows
    assert formats.to_records(read, "messages", {}, None, "x") == rows


def test_expands_user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert sources.read_rows("~/d.jsonl") == ROWS


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n\n" + '{"instruction": "x", \n')
    with pytest.raises(FtuneError) as info:
        sources.read_rows(str(path))
    assert f"{path}, line 4: not valid JSON" in info.value.title
    assert "one JSON object" in info.value.hint


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(FtuneError, match=r"line 2: expected a JSON object, got list"):
        sources.read_rows(str(path))


def test_broken_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(FtuneError, match=r"not valid JSON .*line 2"):
        sources.read_rows(str(path))


@pytest.mark.parametrize("content,problem", [('{"rows": []}', "expected a list of JSON objects"),
                                             ("[1, 2, 3]", "item 1: expected a JSON object, got int"),
                                             ('"text"', "expected a list of JSON objects"),
                                             ('{"data": [1]}', "item 1: expected a JSON object")])
def test_json_of_the_wrong_shape(tmp_path, content, problem):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(FtuneError, match=problem):
        sources.read_rows(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_missing_file(tmp_path, suffix):
    path = tmp_path / f"missing{suffix}"
    with pytest.raises(FtuneError) as info:
        sources.read_rows(str(path))
    assert info.value.title == f"data file {path} does not exist"


def test_missing_shipped_file_names_resolved_path():
    with pytest.raises(FtuneError) as info:
        sources.read_rows("ftune:no-such-file.jsonl")
    assert str(resources.data_root() / "data" / "no-such-file.jsonl") in info.value.title


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("hello\n")
    with pytest.raises(FtuneError, match=r"unsupported data file; use one of \.json, \.jsonl, \.csv, \.parquet, \.txt"):
        sources.read_rows(str(path))


@pytest.mark.parametrize("name,content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "instruction,output\n")])
def test_empty_file_has_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(FtuneError, match="no rows"):
        sources.read_rows(str(path))


def test_unknown_hub_dataset_fails_fast_offline():
    import time

    start = time.monotonic()
    with pytest.raises(FtuneError) as info:
        sources.read_rows("no-such-org/no-such-dataset")
    assert time.monotonic() - start < 20
    err = info.value
    assert "'no-such-org/no-such-dataset'" in err.title
    assert "local Hugging Face cache" in err.title
    assert len(err.problems) == 1
    assert "local .jsonl/.json/.csv/.parquet file" in err.hint


def test_fingerprint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    st = path.stat()
    assert sources.fingerprint(str(path)) == f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    assert sources.fingerprint("org/name") == "org/name"


def test_empty_required_csv_cell_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nSay hi.,,hi\nSay bye.,,\n")
    rows = sources.read_rows(str(path))
    with pytest.raises(FtuneError, match=r"row 2: column 'output' is missing or empty"):
        formats.to_records(rows, "alpaca", {}, None, "dataset.sources[0]")


# ----------------------------------------------------------------------------- build
WORDS = "hello world paris france sort these numbers reverse word plural count letters convert kilometres".split()
N_ROWS = 30


def write_alpaca(path: Path, n: int = N_ROWS) -> Path:
    rows = [{"instruction": f"{WORDS[i % len(WORDS)]} {i}", "input": "", "output": f"answer {i} {WORDS[(i * 3) % len(WORDS)]}"}
            for i in range(n)]
    return write_jsonl(path, rows)


def dataset_cfg(path: Path, **kw) -> DatasetConfig:
    weight = kw.pop("weight", 1.0)
    defaults = dict(name="tiny", sources=[SourceConfig(path=str(path), format="alpaca", weight=weight)],
                    template="chatml", max_seq_len=64, eval_fraction=0.1)
    defaults.update(kw)
    return DatasetConfig(**defaults)


def user_texts(samples: list[dict], tokenizer) -> list[str]:
    """The instruction of each sample (its user turn), read back from the tokens."""
    out = []
    for s in samples:
        text = tokenizer.decode(s["input_ids"])
        out.append(text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0])
    return out


def all_instructions(n: int = N_ROWS) -> list[str]:
    return [f"{WORDS[i % len(WORDS)]} {i}" for i in range(n)]


def test_build_uses_cache_on_second_call(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"))
    first = build(cfg, "sft", 42, tiny_tokenizer)
    assert "from_cache" not in first.stats
    cache_file = Path(first.stats["cache"])
    assert sorted(p.name for p in cache_file.iterdir()) == ["eval.arrow", "meta.json", "train.arrow"]
    assert cache_file.parent == resources.cache_dir() / "data"
    assert cache_file.name == f"tiny-{cache_key(cfg, 'sft', 42, tiny_tokenizer)}"

    uncached = build(cfg, "sft", 42, tiny_tokenizer, use_cache=False)

    # The second build must not read or tokenise anything.
    def boom(*a, **k):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(build_mod, "split_records", boom)
    second = build(cfg, "sft", 42, tiny_tokenizer)
    assert second.stats["from_cache"] == str(cache_file)
    assert list(second.train) == list(first.train) == uncached.train
    assert list(second.eval) == list(first.eval)
    assert second.eval_prompts == first.eval_prompts
    assert {k: v for k, v in second.stats.items() if k != "from_cache"} == first.stats


def test_build_without_cache_writes_nothing(tmp_path, tiny_tokenizer):
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"))
    bundle = build(cfg, "sft", 42, tiny_tokenizer, use_cache=False)
    assert not Path(bundle.stats["cache"]).exists()
    again = build(cfg, "sft", 42, tiny_tokenizer, use_cache=False)
    assert "from_cache" not in again.stats and again.train == bundle.train


def test_cache_key_changes_with_inputs(tmp_path, tiny_tokenizer):
    path = write_alpaca(tmp_path / "a.jsonl")
    cfg = dataset_cfg(path)
    key = cache_key(cfg, "sft", 42, tiny_tokenizer)
    assert key == cache_key(dataset_cfg(path), "sft", 42, tiny_tokenizer)
    others = [cache_key(dataclasses.replace(cfg, max_seq_len=128), "sft", 42, tiny_tokenizer),
              cache_key(dataclasses.replace(cfg, template="qwen"), "sft", 42, tiny_tokenizer),
              cache_key(dataclasses.replace(cfg, packing=True), "sft", 42, tiny_tokenizer),
              cache_key(dataclasses.replace(cfg, train_on="all"), "sft", 42, tiny_tokenizer),
              cache_key(cfg, "pt", 42, tiny_tokenizer),
              cache_key(cfg, "sft", 7, tiny_tokenizer)]
    assert len({key, *others}) == len(others) + 1
    # Editing the source file changes the key too (size/mtime fingerprint).
    write_alpaca(path, N_ROWS + 1)
    assert cache_key(cfg, "sft", 42, tiny_tokenizer) != key


def test_changed_max_seq_len_rebuilds(tmp_path, tiny_tokenizer):
    path = write_alpaca(tmp_path / "a.jsonl")
    a = build(dataset_cfg(path), "sft", 42, tiny_tokenizer)
    b = build(dataset_cfg(path, max_seq_len=16), "sft", 42, tiny_tokenizer)
    assert "from_cache" not in b.stats and a.stats["cache"] != b.stats["cache"]
    assert all(len(s["input_ids"]) <= 16 for s in b.train)
    assert b.stats["train"]["truncated"] > 0


@pytest.mark.parametrize("fraction,n_eval", [(0.1, 3), (0.2, 6), (0.5, 15), (0.0, 0), (1.0, N_ROWS - 1)])
def test_eval_split_follows_eval_fraction(tmp_path, tiny_tokenizer, fraction, n_eval):
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"), eval_fraction=fraction)
    bundle = build(cfg, "sft", 42, tiny_tokenizer, use_cache=False)
    assert len(bundle.eval) == n_eval
    assert len(bundle.train) == N_ROWS - n_eval
    assert bundle.stats["train"]["samples"] == N_ROWS - n_eval
    assert bundle.stats["eval"]["samples"] == n_eval
    train, held = user_texts(bundle.train, tiny_tokenizer), user_texts(bundle.eval, tiny_tokenizer)
    assert sorted(train + held) == sorted(all_instructions())
    assert len(bundle.eval_prompts) == min(4, n_eval)


def test_eval_max_rows_caps_held_out(tmp_path, tiny_tokenizer):
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"), eval_fraction=0.5, eval_max_rows=4)
    bundle = build(cfg, "sft", 42, tiny_tokenizer, use_cache=False)
    assert (len(bundle.train), len(bundle.eval)) == (15, 4)


def test_weight_two_doubles_training_rows_and_keeps_held_out_apart(tmp_path, tiny_tokenizer):
    path = write_alpaca(tmp_path / "a.jsonl")
    once = build(dataset_cfg(path, eval_fraction=0.2), "sft", 42, tiny_tokenizer, use_cache=False)
    twice = build(dataset_cfg(path, eval_fraction=0.2, weight=2.0), "sft", 42, tiny_tokenizer, use_cache=False)
    assert len(once.train) == 24 and len(twice.train) == 48
    assert len(twice.eval) == 6
    train, held = user_texts(twice.train, tiny_tokenizer), user_texts(twice.eval, tiny_tokenizer)
    assert all(train.count(t) == 2 for t in set(train)) and len(set(train)) == 24
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(all_instructions())
    # The held-out split is taken before weighting: the same rows are held out either way.
    assert sorted(held) == sorted(user_texts(once.eval, tiny_tokenizer))


def test_fractional_weight(tmp_path, tiny_tokenizer):
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"), eval_fraction=0.2, weight=1.5)
    bundle = build(cfg, "sft", 42, tiny_tokenizer, use_cache=False)
    assert len(bundle.train) == 24 + 12
    train = user_texts(bundle.train, tiny_tokenizer)
    assert len(set(train)) == 24 and not set(train) & set(user_texts(bundle.eval, tiny_tokenizer))


def test_two_sources_are_mixed_and_split_separately(tmp_path, tiny_tokenizer):
    a = write_alpaca(tmp_path / "a.jsonl", 20)
    b = tmp_path / "b.jsonl"
    write_jsonl(b, [{"question": f"question {i}", "answer": f"answer {i}"} for i in range(10)])
    cfg = DatasetConfig(name="mix", sources=[SourceConfig(path=str(a)), SourceConfig(path=str(b), format="qa", weight=3.0)],
                        template="chatml", max_seq_len=64, eval_fraction=0.2)
    bundle = build(cfg, "sft", 1, tiny_tokenizer, use_cache=False)
    assert len(bundle.eval) == 4 + 2
    assert len(bundle.train) == 16 + 3 * 8
    train = user_texts(bundle.train, tiny_tokenizer)
    assert sum(t.startswith("question") for t in train) == 24


def test_split_is_seeded(tmp_path, tiny_tokenizer):
    path = write_alpaca(tmp_path / "a.jsonl")
    a = build(dataset_cfg(path, eval_fraction=0.2), "sft", 1, tiny_tokenizer, use_cache=False)
    b = build(dataset_cfg(path, eval_fraction=0.2), "sft", 1, tiny_tokenizer, use_cache=False)
    c = build(dataset_cfg(path, eval_fraction=0.2), "sft", 2, tiny_tokenizer, use_cache=False)
    assert a.train == b.train and a.eval == b.eval
    assert user_texts(a.train, tiny_tokenizer) != user_texts(c.train, tiny_tokenizer)


def test_eval_path_replaces_eval_fraction(tmp_path, tiny_tokenizer):
    held = write_jsonl(tmp_path / "held.jsonl", [{"instruction": "held out 1", "output": "x"},
                                                 {"instruction": "held out 2", "output": "y"}])
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"), eval_fraction=0.5, eval_path=str(held))
    bundle = build(cfg, "sft", 42, tiny_tokenizer, use_cache=False)
    assert len(bundle.train) == N_ROWS
    assert user_texts(bundle.eval, tiny_tokenizer) == ["held out 1", "held out 2"]


def test_max_rows(tmp_path, tiny_tokenizer):
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"), max_rows=5)
    assert len(build(cfg, "sft", 42, tiny_tokenizer, use_cache=False).train) == 5


def test_bad_row_in_source_names_source_and_row(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], {"instruction": "no answer"}])
    with pytest.raises(FtuneError, match=r"dataset\.sources\[0\] \(.*a\.jsonl\), row 2: column 'output'"):
        build(dataset_cfg(path), "sft", 42, tiny_tokenizer, use_cache=False)


def test_every_sample_dropped_is_an_error(tmp_path, tiny_tokenizer):
    long = " ".join(["what is the capital of france"] * 20)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": long, "output": "Paris."}] * 4)
    with pytest.raises(FtuneError, match="every training sample was dropped"):
        build(dataset_cfg(path, max_seq_len=16, eval_fraction=0.0), "sft", 42, tiny_tokenizer, use_cache=False)


def test_packing(tmp_path, tiny_tokenizer):
    path = write_alpaca(tmp_path / "a.jsonl")
    plain = build(dataset_cfg(path, eval_fraction=0.2), "sft", 42, tiny_tokenizer, use_cache=False)
    packed = build(dataset_cfg(path, eval_fraction=0.2, packing=True), "sft", 42, tiny_tokenizer, use_cache=False)
    rows = packed.train
    assert len(rows) < len(plain.train)
    assert packed.stats["packed_rows"] == {"train": len(rows), "eval": len(packed.eval)}
    for row in rows:
        assert len(row["input_ids"]) <= 64
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
    # Rows hold the unpacked samples in order; positions restart at 0 for each of them and the
    # first token of every sample is not a target.
    samples = iter(plain.train)
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(row["input_ids"])]):
            sample = next(samples)
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["input_ids"][a:b] == sample["input_ids"]
            assert row["labels"][a:b] == [IGNORE] + sample["labels"][1:]
    assert next(samples, None) is None
    # Packing changes the cache key, so a packed build is never served unpacked rows.
    assert packed.stats["cache"] != plain.stats["cache"]


def test_cache_is_memory_mapped_arrow_and_num_proc_changes_nothing(tmp_path, tiny_tokenizer):
    from ftune.data import store

    path = write_alpaca(tmp_path / "a.jsonl")
    one = build(dataset_cfg(path), "sft", 42, tiny_tokenizer, use_cache=False)
    cached = build(dataset_cfg(path, packing=True), "sft", 42, tiny_tokenizer)
    assert isinstance(cached.train, store.Rows) and cached.train[0] == cached.train[-len(cached.train)]
    with pytest.raises(IndexError):
        cached.train[len(cached.train)]
    # several processes, small chunks: the same samples in the same order
    original = build_mod.CHUNK
    try:
        build_mod.CHUNK = 7
        two = build(dataclasses.replace(dataset_cfg(path), num_proc=2), "sft", 42, tiny_tokenizer, use_cache=False)
    finally:
        build_mod.CHUNK = original
    assert two.train == one.train and two.eval == one.eval and two.stats["train"] == one.stats["train"]


def test_an_interrupted_build_leaves_no_cache_entry(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = dataset_cfg(write_alpaca(tmp_path / "a.jsonl"))

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "prompt_of", dies)  # after the splits are planned, before they are written
    with pytest.raises(KeyboardInterrupt):
        build(cfg, "sft", 42, tiny_tokenizer)
    monkeypatch.undo()
    assert not list((resources.cache_dir() / "data").glob(f"tiny-{cache_key(cfg, 'sft', 42, tiny_tokenizer)}*"))
