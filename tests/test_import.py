"""`ftune import`: LLaMA-Factory and axolotl configs, written here in those tools' documented
layouts, become recipe files that compose (checked by the same schema as a shipped recipe) with
the values carried over, and every key left behind is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.migrate import axolotl, llamafactory, write

LF_SFT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo,glaive_toolcall_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
deepspeed: examples/deepspeed/ds_z3_config.json
neftune_noise_alpha: 5
"""
DATASET_INFO = {
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools"}},
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
}


CALL = json.dumps({"name": "w", "arguments": {}})


@pytest.fixture()
def lf_project(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO))
    rows = {"identity.json": [{"instruction": "hi", "input": "", "output": "Hello! I am {{name}}."}],
            "alpaca_en_demo.json": [{"instruction": "Add.", "input": "2+2", "output": "4"}],
            "glaive_toolcall_en_demo.json": [{"conversations": [{"from": "human", "value": "Weather?"},
                                                                {"from": "function_call", "value": CALL},
                                                                {"from": "observation", "value": "sun"},
                                                                {"from": "gpt", "value": "Sunny."}],
                                              "tools": "[{\"name\": \"w\", \"parameters\": {}}]"}],
            "dpo_en_demo.json": [{"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
                                  "rejected": {"from": "gpt", "value": "5"}}],
            "kto_en_demo.json": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  "label": True}]}
    for name, content in rows.items():
        (data / name).write_text(json.dumps(content))
    (data / "c4_demo.jsonl").write_text(json.dumps({"text": "some web text"}) + "\n")
    (tmp_path / "llama3_lora_sft.yaml").write_text(LF_SFT)
    return tmp_path


def _composed(recipe: Path, *extra: str):
    return compose([f"recipe={recipe}", *extra]).cfg


def test_llamafactory_sft_config(lf_project):
    m = llamafactory.convert(lf_project / "llama3_lora_sft.yaml")
    recipe = write(m, lf_project / "out.yaml")
    cfg = _composed(recipe)
    assert (cfg.model.path, cfg.model.trust_remote_code) == ("meta-llama/Meta-Llama-3-8B-Instruct", True)
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha, list(cfg.method.target_modules)) == ("lora", 8, 16, ["all-linear"])
    assert (cfg.stage.name, cfg.dataset.template, cfg.dataset.max_seq_len, cfg.dataset.max_rows) == ("sft", "llama3", 2048, 1000)
    assert [(s.format, Path(s.path).name) for s in cfg.dataset.sources] == [
        ("alpaca", "identity.json"), ("alpaca", "alpaca_en_demo.json"), ("sharegpt", "glaive_toolcall_en_demo.json")]
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum, t.lr, t.epochs, t.lr_scheduler, t.warmup_ratio) == (1, 8, 1e-4, 3.0, "cosine", 0.1)
    assert (t.save_every, t.log_every, t.output_dir, t.run_name) == (500, 10, "saves/llama3-8b/lora", "sft")
    assert cfg.hardware.name == "deepspeed-zero3" and cfg.hardware.precision == "bf16"
    skipped = dict(m.not_carried)
    assert "neftune_noise_alpha" in skipped and skipped["neftune_noise_alpha"] == "no ftune equivalent"
    assert "preprocessing_num_workers" in skipped and "ddp_timeout" in skipped
    assert "# not carried over: neftune_noise_alpha: no ftune equivalent" in recipe.read_text()


def test_llamafactory_dataset_layouts_read_the_rows(lf_project, tiny_model_dir):
    """The imported sources read the demo files with config only: tool calls, ranking, KTO, text."""
    from ftune.data.build import split_records

    base = (lf_project / "llama3_lora_sft.yaml").read_text()
    cases = [("sft", "glaive_toolcall_en_demo", "sharegpt"), ("dpo", "dpo_en_demo", "preference"),
             ("kto", "kto_en_demo", "feedback"), ("pt", "c4_demo", "text")]
    for stage, name, fmt in cases:
        (lf_project / f"{stage}.yaml").write_text(base.replace("stage: sft", f"stage: {stage}")
                                                  .replace("dataset: identity,alpaca_en_demo,glaive_toolcall_en_demo",
                                                           f"dataset: {name}"))
        recipe = write(llamafactory.convert(lf_project / f"{stage}.yaml"), lf_project / f"{stage}-ftune.yaml")
        cfg = _composed(recipe, f"model.path={tiny_model_dir}", "dataset.eval_fraction=0")
        assert cfg.dataset.sources[0].format == fmt
        (record,), _ = split_records(cfg.dataset, 0)
        if fmt == "sharegpt":
            assert record["tools"][0]["function"]["name"] == "w"
            assert record["messages"][1]["tool_calls"][0]["function"]["name"] == "w"
        if fmt == "preference":
            assert (record["chosen"], record["rejected"]) == ("4", "5")
        if fmt == "feedback":
            assert record["label"] is True and record["completion"] == "yo" and cfg.stage.loss == "kto"
        if fmt == "text":
            assert record == {"text": "some web text"} and cfg.stage.name == "pt"


def test_llamafactory_errors(lf_project, tmp_path):
    cfg = lf_project / "llama3_lora_sft.yaml"
    with pytest.raises(FtuneError, match="not_there not in the dataset_info.json"):
        (lf_project / "x.yaml").write_text(cfg.read_text().replace("dataset: identity,", "dataset: not_there,"))
        llamafactory.convert(lf_project / "x.yaml")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "c.yaml").write_text(LF_SFT)
    with pytest.raises(FtuneError, match="--dataset-info"):
        llamafactory.convert(tmp_path / "alone" / "c.yaml")
    (tmp_path / "alone" / "d.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(FtuneError, match="no model_name_or_path"):
        llamafactory.convert(tmp_path / "alone" / "d.yaml")


AXOLOTL_QLORA = """\
base_model: NousResearch/Llama-3.2-1B
load_in_4bit: true
strict: false

datasets:
  - path: data/convs.jsonl
    type: chat_template
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
    roles:
      user: ["human"]
      assistant: ["gpt", "bot"]
    message_field_training: train
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/qlora-out

adapter: qlora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true

sequence_len: 2048
sample_packing: true
pad_to_sequence_len: true

wandb_project:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: paged_adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002
bf16: auto
tf32: false
gradient_checkpointing: true
flash_attention: true
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  pad_token: "<|end_of_text|>"
"""


def test_axolotl_qlora_config(tmp_path, tiny_model_dir):
    from ftune.data.build import split_records

    (tmp_path / "data").mkdir()
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "no", "train": False},
                             {"from": "human", "value": "hi?"}, {"from": "gpt", "value": "hello"}]}
    (tmp_path / "data" / "convs.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "qlora.yml").write_text(AXOLOTL_QLORA)
    m = axolotl.convert(tmp_path / "qlora.yml")
    recipe = write(m, tmp_path / "qlora-ftune.yaml")
    cfg = _composed(recipe)
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha, cfg.method.dropout) == ("qlora", 32, 16, 0.05)
    assert (cfg.dataset.max_seq_len, cfg.dataset.packing, cfg.dataset.eval_fraction) == (2048, True, 0.1)
    t = cfg.train
    assert (t.grad_accum, t.micro_batch_size, t.epochs, t.optim, t.lr, t.warmup_steps) == (4, 2, 1, "paged_adamw_8bit", 2e-4, 10)
    assert (t.gradient_checkpointing, cfg.model.attn_implementation, cfg.hardware.precision) == ("true", "flash_attention_2",
                                                                                                   "bf16")
    src = cfg.dataset.sources[0]
    assert src.format == "messages" and dict(src.columns) == {"messages": "conversations"}
    assert dict(src.message_keys) == {"role": "from", "content": "value"}
    skipped = dict(m.not_carried)
    assert {"evals_per_epoch", "saves_per_epoch", "special_tokens", "pad_to_sequence_len"} <= set(skipped)
    cfg = _composed(recipe, f"model.path={tiny_model_dir}", "dataset.eval_fraction=0", "method=lora")
    (record,), _ = split_records(cfg.dataset, 0)
    assert record["messages"][1] == {"role": "assistant", "content": "no", "train": False}


def test_axolotl_dpo_and_completion(tmp_path):
    (tmp_path / "d.yml").write_text(yaml.safe_dump({
        "base_model": "Qwen/Qwen2.5-0.5B", "rl": "dpo", "rl_beta": 0.2, "chat_template": "chatml",
        "datasets": [{"path": "argilla/distilabel-intel-orca-dpo-pairs", "type": "chatml.intel"}]}))
    cfg = _composed(write(axolotl.convert(tmp_path / "d.yml"), tmp_path / "d-ftune.yaml"))
    assert (cfg.stage.name, cfg.stage.loss, cfg.stage.beta, cfg.dataset.template) == ("dpo", "sigmoid", 0.2, "chatml")
    assert cfg.dataset.sources[0].format == "preference" and dict(cfg.dataset.sources[0].columns) == {"prompt": "question"}
    assert cfg.method.name == "full"
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
    (tmp_path / "c.yml").write_text(yaml.safe_dump({
        "base_model": "gpt2", "adapter": "lora", "datasets": [{"path": "corpus.jsonl", "type": "completion", "field": "body"}]}))
    cfg = _composed(write(axolotl.convert(tmp_path / "c.yml"), tmp_path / "c-ftune.yaml"))
    assert cfg.stage.name == "pt" and cfg.dataset.sources[0].format == "text"
    assert dict(cfg.dataset.sources[0].columns) == {"text": "body"}


def test_import_command_writes_and_lists(lf_project):
    from tests.test_cli import run_cli

    out = run_cli("import", "llamafactory", str(lf_project / "llama3_lora_sft.yaml"), "--out", str(lf_project / "r.yaml"))
    assert out.returncode == 0, out.stderr
    assert f"wrote {lf_project / 'r.yaml'}" in out.stdout and "not carried over" in out.stdout
    assert "neftune_noise_alpha: no ftune equivalent" in out.stdout
    shown = run_cli("config", "show", f"recipe={lf_project / 'r.yaml'}")
    assert shown.returncode == 0, shown.stderr
    assert "path: meta-llama/Meta-Llama-3-8B-Instruct" in shown.stdout
