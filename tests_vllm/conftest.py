"""Tests of the vLLM integration against a real vLLM engine serving the embedded SmolLM2 (nothing mocked).

Run in the environment that has vLLM (``scripts/install_vllm.sh``): ``.venv-vllm/bin/python -m pytest tests_vllm``.
One engine serves every test: its engine core runs in this process (so the tests can read the scheduler's
blocks between steps); its worker is a separate process, as in any vLLM deployment.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process; the worker still is not
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402

BLOCK = 32
POOL = 200  # KV blocks: 6 400 tokens, a few uncompressed prompts at once


@pytest.fixture(scope="session")
def model_dir() -> str:
    from kvpolicy import models

    models.load_default()  # converts and caches the embedded GGUF on first use
    return str(models.cache_dir() / models.DEFAULT_NAME)


@pytest.fixture(scope="session")
def llm(model_dir: str):  # noqa: ANN201
    from vllm import LLM

    engine = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=4096,
                 max_num_batched_tokens=256, max_num_seqs=8, block_size=BLOCK, num_gpu_blocks_override=POOL,
                 additional_config={"kvpolicy": {"enabled": False}})
    yield engine
    del engine


@pytest.fixture(scope="session")
def scheduler(llm):  # noqa: ANN001, ANN201
    return llm.llm_engine.engine_core.engine_core.scheduler


@pytest.fixture(scope="session")
def tokenizer(model_dir: str):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_model(model_dir: str):  # noqa: ANN201
    from kvpolicy import models

    model, _ = models.load(model_dir)
    return model


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:  # noqa: ANN001
    """Three Austen passages: 700 tokens (chunked prefill splits it in 3), 180 (one chunk), 1100."""
    from kvpolicy import data

    text = data.austen_text()
    return [tokenizer(text[2000 + 3000 * i: 10000 + 3000 * i]).input_ids[:n] for i, n in enumerate([700, 180, 1100])]
