"""Vision-language models: modality from input ids, LOOK-M on LLaVA, Qwen2-VL and Qwen2.5-VL (tiny random weights).

Prompts have the shape ``[text][image tokens][question]`` with L = 160 positions and 144 visual ones, so
that at budget 0.2 (M = N = 16) the text of the candidate part P is smaller than N and the images fill
the rest: every text token kept, 16 visual entries kept per layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

import kvpolicy
from kvpolicy.integrate import attention_modules, visual_token_ids

from conftest import make_tiny_llava

IMG, VID, V_START, V_END = 100, 101, 102, 103
N_IMG = 144


def _text(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 100, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llava():
    """Tiny LLaVA: CLIP tower 48x48 px, 4 px patches -> 144 visual tokens; Llama text model with GQA."""
    model = make_tiny_llava(48, N_IMG, IMG)
    ids = torch.cat([_text(2, 1), torch.full((1, N_IMG), IMG), _text(14, 2)], 1)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))}
    return model, inputs


#: the language model and special tokens of both tiny Qwen VLMs
_QWEN_LM = dict(text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                 rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                  "rope_theta": 1e4}),
                image_token_id=IMG, video_token_id=VID, vision_start_token_id=V_START, vision_end_token_id=V_END)


def _qwen_inputs() -> dict[str, torch.Tensor]:
    """``[text][vision start][144 image tokens][vision end][question]`` with a 24x24-patch image."""
    ids = torch.cat([_text(2, 1), torch.tensor([[V_START]]), torch.full((1, N_IMG), IMG), torch.tensor([[V_END]]),
                     _text(12, 2)], 1)
    return {"input_ids": ids, "image_grid_thw": torch.tensor([[1, 24, 24]]), "mm_token_type_ids": (ids == IMG).int(),
            "pixel_values": torch.randn(576, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(3))}


@pytest.fixture(scope="module")
def qwen2vl():
    """Tiny Qwen2-VL: a 24x24-patch grid merged 2x2 -> 144 visual tokens; multi-axis (mrope) positions."""
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        **_QWEN_LM)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    return model, _qwen_inputs()


@pytest.fixture(scope="module")
def qwen25vl():
    """Tiny Qwen2.5-VL: windowed vision attention (window 16 px), the same 144 merged visual tokens, mrope."""
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                           fullatt_block_indexes=[1]),
        **_QWEN_LM)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return model, _qwen_inputs()


MODELS = ["llava", "qwen2vl", "qwen25vl"]


def _generate(model, inputs, cache=None, new=6):
    kw = {} if cache is None else {"cache": cache}
    return model.generate(**inputs, **kw, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("name", MODELS)
def test_visual_ids_and_attention_modules(name, request):
    """Only the language model's causal attention layers are taken; vision-tower attention is left alone."""
    model, _ = request.getfixturevalue(name)
    assert set(visual_token_ids(model)) == ({IMG} if name == "llava" else {IMG, VID})
    mods = attention_modules(model)
    assert [m.layer_idx for m in mods] == [0, 1]
    lm = model.model.language_model
    assert all(any(m is x for x in lm.modules()) for m in mods)


@pytest.mark.parametrize("name", MODELS)
def test_full_budget_reproduces_the_uncompressed_logits(name, request):
    """Budget >= length: logits at every decoding step equal the plain run (true positions, mrope)."""
    model, inputs = request.getfixturevalue(name)
    ref = _generate(model, inputs)
    with kvpolicy.compress(model, "lookm-pivot", budget=1.0) as cache:
        out = _generate(model, inputs, cache)
        assert cache.get_seq_length() == 160 + 5  # logical length n_seen
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _record_positions(model) -> tuple[list[torch.Tensor], object]:
    """Record the ``position_ids`` every forward hands to the language model's rotary embedding."""
    seen: list[torch.Tensor] = []
    rotary = model.model.language_model.rotary_emb

    def hook(_m, args, kwargs):  # noqa: ANN001, ANN202
        seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone())

    handle = rotary.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("name", MODELS)
def test_lookm_pivot_keeps_text_and_reduces_images(name, request):
    """Budget 0.2: all text kept, images cut to the rest; decode positions equal the uncompressed run's."""
    model, inputs = request.getfixturevalue(name)
    ids = inputs["input_ids"]
    text_pos = (ids[0] != IMG).nonzero().flatten()
    ref_pos, handle = _record_positions(model)
    ref = _generate(model, inputs)
    handle.remove()
    got_pos, handle = _record_positions(model)
    with kvpolicy.compress(model, "lookm-pivot", budget=0.2) as cache:
        out = _generate(model, inputs, cache)
    handle.remove()
    assert len(got_pos) == len(ref_pos) == 6
    for a, b in zip(got_pos, ref_pos, strict=True):  # Qwen2-VL: [3, B, q] multi-axis positions
        assert torch.equal(a, b)
    if name in ("qwen2vl", "qwen25vl"):  # mrope: 3 axes, and the 144 visual tokens span only 12 positions
        assert ref_pos[-1].shape[0] == 3 and int(ref_pos[-1].max()) == 164 - (144 - 12)
    assert out.sequences.shape == (1, 166)
    assert all(lg.shape == (1, 128) for lg in out.logits)
    for layer, row in zip(cache.layers, cache.report().layers, strict=True):
        assert layer.physical_length == 32 + 5 and row.tokens_kept == 37
        assert row.image_tokens_in == N_IMG and row.image_tokens_kept == 16
        assert row.tokens_merged == 160 - 32
        for h in range(layer.keys.shape[1]):
            pos = layer.positions[0, h]
            assert set(text_pos.tolist()) <= set(pos.tolist())  # every text token kept, on every head
            img_pos = pos[layer.is_image[0, h]]
            assert len(img_pos) == 16  # N - |text of P| images of P, plus the images of the recent window
            assert int((img_pos >= 160 - 16).sum()) == int((ids[0, 144:] == IMG).sum())
            assert torch.equal(pos, pos.sort().values)
    ev = cache.layers[0].events[0]
    assert (ev.image_tokens_in, ev.image_tokens_kept, ev.tokens_merged) == (N_IMG, 16, 128)


def test_llava_batch_with_left_padding(llava):
    """Two prompts of different lengths, left-padded: pads never kept; per row text kept and images fill N."""
    model, inputs = llava
    short = torch.cat([_text(2, 1), torch.full((1, N_IMG), IMG), _text(4, 5)], 1)  # 150 tokens
    ids = torch.cat([torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1), inputs["input_ids"]], 0)
    mask = (torch.arange(160) >= torch.tensor([[10], [0]])).long()
    pix = inputs["pixel_values"].repeat(2, 1, 1, 1)
    with kvpolicy.compress(model, "lookm-pivot", budget=0.2) as cache:
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, cache=cache,
                             max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, 163)
    for layer in cache.layers:
        for b, (n, n_text) in enumerate([(150, 6), (160, 16)]):
            valid = layer.valid[b, 0]
            assert int(valid.sum()) == n // 5 + 2  # budget 0.2 of the row's valid tokens, + 2 decoded
            assert int(layer.positions[b][layer.valid[b]].min()) == (10 if b == 0 else 0)  # no pad kept
            kept_text = int((valid & ~layer.is_image[b, 0]).sum()) - 2
            assert kept_text == n_text
            assert int((valid & layer.is_image[b, 0]).sum()) == n // 5 - n_text
