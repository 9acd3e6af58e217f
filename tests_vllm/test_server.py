"""The OpenAI server (`vllm.entrypoints.openai.api_server`, what `vllm serve` runs) with kvpolicy configured."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import kvpolicy


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # as deployed: engine core and worker in their own processes
    # `vllm serve` runs this module; vllm-cpu 0.32's `vllm` script looks up a distribution named "vllm" and fails
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "2048", "--port", str(port),
           "--additional-config", json.dumps({"kvpolicy": {"policy": "snapkv", "budget": 0.2}})]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_server_compresses_like_the_transformers_path(server, model_dir, hf_model, tokenizer, prompts) -> None:  # noqa: ANN001
    port, log = server
    text = tokenizer.decode(prompts[0])
    ids = tokenizer(text).input_ids
    status, out = _post(port, {"model": model_dir, "prompt": text, "max_tokens": 12, "temperature": 0})
    assert status == 200, out
    with kvpolicy.compress(hf_model, "snapkv", budget=0.2) as cache:
        g = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, cache=cache)
    assert out["choices"][0]["text"] == tokenizer.decode(g[0, len(ids):])
    assert "kvpolicy: compressing every request's prompt with policy 'snapkv'" in log.read_text()


def test_server_request_options_and_refusals(server, model_dir) -> None:  # noqa: ANN001
    port, _ = server
    status, out = _post(port, {"model": model_dir, "prompt": "Hello there, how", "max_tokens": 4,
                               "vllm_xargs": {"kvpolicy": "off"}})
    assert status == 200, out
    status, out = _post(port, {"model": model_dir, "prompt": "Hello", "max_tokens": 4,
                               "vllm_xargs": {"kvpolicy": json.dumps({"policy": "h2o"})}})
    assert status == 400
    assert "accumulated attention" in out["error"]["message"] and "snapkv" in out["error"]["message"]
    status, out = _post(port, {"model": model_dir, "prompt": "Hello", "max_tokens": 4,
                               "vllm_xargs": {"kvpolicy": json.dumps({"budget": 2.0})}})
    assert status == 400 and "budget" in out["error"]["message"]
