"""`ftune serve` over real HTTP: two adapters in one batch answer exactly as each does alone;
streaming; the model list; bad requests; LRU eviction keeps answers unchanged."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.serve.engine import AdapterPool, Request
from ftune.serve.server import serve
from ftune.train.run import train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("serve-runs")
    common = [f"model.path={tiny_model_dir}", "model.name=tiny", "hardware.precision=fp32", f"train.output_dir={out}",
              "train.sample_max_new_tokens=0", "train.tensorboard=false", "dataset.max_rows=32", "train.max_steps=6",
              "train.lr=3e-2", "dataset.max_seq_len=128"]
    train(compose([*common, "train.run_name=alpha", "train.seed=1"]))
    train(compose([*common, "train.run_name=beta", "train.seed=2", "method.r=4", "train.lr=2e-3"]))
    return [out / "alpha", out / "beta"]


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


MSG = [{"role": "user", "content": "what is the capital of france"}]


def test_mixed_adapter_batch_equals_each_adapter_alone(two_runs):
    pool = AdapterPool(two_runs, max_loaded=2)
    names = ["alpha", "beta", "__base__"]
    alone = {name: pool.generate([Request(name, MSG, 12)])[0]["ids"] for name in names}
    assert alone["alpha"] != alone["__base__"]  # the adapter changes the answer (tiny models: greedy ties are common)
    mixed = pool.generate([Request(n, MSG, 12) for n in names])
    assert [m["ids"] for m in mixed] == [alone[n] for n in names]
    # Logits, where every adapter differs: one mixed forward == each adapter's own forward.
    ids = torch.tensor([pool.prompt_ids(MSG)] * 3)
    with torch.no_grad():
        together = pool.model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            own = pool.model(input_ids=ids[:1], adapter_names=[name]).logits[0]
            assert torch.allclose(together[row], own, atol=1e-5), name
    assert not torch.allclose(together[0], together[1]) and not torch.allclose(together[1], together[2])


def test_lru_eviction_keeps_answers(two_runs):
    pool = AdapterPool(two_runs, max_loaded=1)
    first = pool.generate([Request("alpha", MSG, 8)])[0]["ids"]
    pool.generate([Request("beta", MSG, 8)])  # evicts alpha from the model; its weights stay on the host
    assert list(pool.loaded) == ["beta"]
    assert pool.generate([Request("alpha", MSG, 8)])[0]["ids"] == first


def test_http_server_batches_requests_for_different_adapters(two_runs):
    pool = AdapterPool(two_runs, max_loaded=2)
    expected = {n: pool.generate([Request(n, MSG, 10)])[0]["text"] for n in ("alpha", "beta")}
    server = serve(pool, port=0, window_ms=300)
    port = server.server_address[1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as resp:
            assert {m["id"] for m in json.loads(resp.read())["data"]} == {"__base__", "alpha", "beta"}
        results = {}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(
            n, post(port, {"model": n, "messages": MSG, "max_tokens": 10}))) for n in ("alpha", "beta")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in ("alpha", "beta"):
            assert results[n]["choices"][0]["message"]["content"] == expected[n]
        assert 2 in server.batcher.batches  # both requests went through one forward batch
        # Streaming: the pieces add up to the same answer.
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps({"model": "alpha", "messages": MSG, "max_tokens": 10,
                                                      "stream": True}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text.strip() == expected["alpha"]
        with pytest.raises(urllib.error.HTTPError) as err:
            post(port, {"model": "gamma", "messages": MSG})
        assert err.value.code == 400 and "served: __base__, alpha, beta" in err.value.read().decode()
    finally:
        server.shutdown()


def test_cli_chat_streams_an_answer(two_runs):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ftune.cli", "chat", str(two_runs[0]), "--max-tokens", "6"],
                            input="what is the capital of france\n\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model>" in result.stdout and "Traceback" not in result.stderr


def test_vllm_engine_command_and_refusals(tiny_overrides, tmp_path):
    """--engine vllm hands the same adapters to vLLM: one --lora-modules entry per run, the base as a
    folder, rank rounded up to one vLLM accepts, the training format as a chat template file."""
    from ftune.serve import vllm

    for name, r in (("one", 4), ("two", 12)):
        train(compose([*tiny_overrides, "train.max_steps=1", f"train.run_name={name}", f"method.r={r}",
                       "dataset.template=chatml"]))
    runs = [str(tmp_path / "outputs" / n) for n in ("one", "two")]
    result = subprocess.run([sys.executable, "-m", "ftune.cli", "serve", *runs, "--engine", "vllm", "--print-command",
                             "--port", "8123", "--max-loaded", "8"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout.strip())
    assert cmd[1] == "serve" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and cmd[cmd.index("--max-loras") + 1] == "2"
    lora = cmd[cmd.index("--lora-modules") + 1: cmd.index("--lora-modules") + 3]
    assert [entry.split("=")[0] for entry in lora] == ["one", "two"]
    assert all(Path(entry.split("=", 1)[1], "adapter_config.json").is_file() for entry in lora)
    assert Path(cmd[2], "config.json").is_file()  # the base as a Hugging Face folder
    assert "<|im_start|>" in Path(cmd[cmd.index("--chat-template") + 1]).read_text()
    # Not a plain LoRA adapter: refused with the reason; no CUDA here: refused with what to do.
    train(compose([*tiny_overrides, "train.max_steps=1", "train.run_name=ia3", "method=ia3"]))
    with pytest.raises(FtuneError, match="not a plain LoRA adapter"):
        vllm.adapters([str(tmp_path / "outputs" / "ia3")])
    if not torch.cuda.is_available():
        with pytest.raises(FtuneError, match="cannot start here"):
            vllm.check_available()


def test_the_official_openai_client_gets_answers_and_usage(two_runs):
    """The official `openai` client against `ftune serve`: the answer, its finish reason and the
    usage the API reports (prompt_tokens = the rendered prompt's tokens, total = prompt +
    completion), with and without streaming."""
    from openai import OpenAI

    pool = AdapterPool(two_runs, max_loaded=2)
    expected = pool.generate([Request("alpha", MSG, 8)])[0]
    prompt_tokens = len(pool.prompt_ids(MSG))
    server = serve(pool, port=0, window_ms=10)
    client = OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)
    try:
        reply = client.chat.completions.create(model="alpha", messages=MSG, max_tokens=8)
        assert reply.choices[0].message.content == expected["text"]
        assert reply.choices[0].finish_reason == expected["finish"]
        assert reply.usage.prompt_tokens == prompt_tokens > 0
        assert reply.usage.completion_tokens == len(expected["ids"]) > 0
        assert reply.usage.total_tokens == prompt_tokens + len(expected["ids"])
        chunks = list(client.chat.completions.create(model="alpha", messages=MSG, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() == expected["text"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected["finish"]
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
        assert chunks[-1].usage.total_tokens == prompt_tokens + len(expected["ids"])
    finally:
        server.shutdown()
