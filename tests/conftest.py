"""Shared fixtures: the embedded SmolLM2 (loaded once per run), tiny random models, real text."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct, fp32, eval mode."""
    from kvpolicy import models

    model, tok = models.load_default()
    return model, tok


@pytest.fixture(scope="session")
def gemma3():
    """``(model, tokenizer)`` of the packaged Gemma-3-270M (18 layers, 15 of them sliding-window), fp32."""
    from kvpolicy import models

    return models.load_default("gemma3-270m")


@pytest.fixture(scope="session")
def austen():
    """Pride & Prejudice text (fetched from Debian's r-cran-janeaustenr on first use)."""
    from kvpolicy import data

    return data.austen_text("Pride & Prejudice")


def make_tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, vocab: int = 128,
                    max_pos: int = 16384, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_tiny_llava(image_size: int, n_img: int, img_id: int, seed: int = 0):
    """Tiny random LLaVA: CLIP tower with 4 px patches, Llama text model with GQA (2 layers, 4/2 heads)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=4, projection_dim=32),
        text_config=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
        image_token_index=img_id, image_seq_length=n_img)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smol_passage(smollm2, austen):
    """``input_ids [1, ~1500]`` of a real Austen passage, chat-formatted for SmolLM2."""
    _, tok = smollm2
    ids = tok(austen[5000:30000], add_special_tokens=False)["input_ids"][:1500]
    return torch.tensor([ids])
