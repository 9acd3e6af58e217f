"""The benchmark harness (kvpolicy.bench) end to end on a tiny random Llama, plus golden metric examples.

The SmolLM2 benchmark itself is a documented command (docs/benchmarks.md), not a test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvpolicy import observe
from kvpolicy.bench import metrics as M
from kvpolicy.bench import report, runner, speed, tasks

from tests.conftest import make_tiny_llama


class ByteTokenizer:
    """A byte-level tokenizer for tiny models: one id per UTF-8 byte (vocab 256), eos = 0."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode("utf-8", errors="replace"))}

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(layers=2, heads=4, kv_heads=2, hidden=32, vocab=256, seed=1), ByteTokenizer()


@pytest.fixture(scope="module")
def books(austen):
    return {"Pride & Prejudice": austen}


# ------------------------------------------------------------------------------------------- golden metrics
def test_rouge_l_and_agreement_golden():
    ref, cand = [1, 2, 3, 4, 5], [1, 3, 2, 4, 6, 5]
    assert M.lcs_length(ref, cand) == 4  # 1 3 4 5 (or 1 2 4 5)
    p, r = 4 / 6, 4 / 5
    assert M.rouge_l(ref, cand) == pytest.approx(2 * p * r / (p + r))
    assert M.rouge_l(ref, []) == 0.0
    assert M.token_agreement(ref, cand) == pytest.approx(2 / 5)  # positions 0 and 3
    assert M.prefix_match(ref, cand) == 1
    assert M.token_agreement(ref, ref) == 1.0 and M.rouge_l(ref, ref) == 1.0


def test_passkey_match_and_nll():
    assert M.passkey_correct(" 48213. Remember", "48213")
    assert not M.passkey_correct(" 4821", "48213")
    assert not M.passkey_correct(" the code", "48213")
    logits = torch.tensor([0.0, math.log(3.0)])  # p = [1/4, 3/4]
    assert M.token_nll(logits, 1) == pytest.approx(-math.log(0.75))
    fed = []

    def step(t: int) -> torch.Tensor:
        fed.append(t)
        return torch.tensor([math.log(3.0), 0.0])

    nll = M.teacher_forced_nll(step, logits, [1, 0, 1])
    assert fed == [1, 0]  # the last token is never fed
    assert nll == pytest.approx([-math.log(0.75), -math.log(0.75), -math.log(0.25)])
    assert M.greedy_tokens(step, logits, 3) == [1, 0, 0]


def test_attention_mass_matches_dense():
    torch.manual_seed(0)
    b, hkv, g, t, n_ctx, d = 1, 2, 2, 5, 40, 8
    q = torch.randn(b, hkv * g, t, d)
    k = torch.randn(b, hkv, n_ctx + t, d)
    kept = torch.rand(b, hkv, n_ctx) < 0.3
    ref = {"n_ctx": n_ctx, "queries": [q], "keys": [k], "scaling": [d ** -0.5]}
    got = runner.attention_mass_retained(ref, [kept])
    # dense: query i (position n_ctx + i) sees keys 0 .. n_ctx + i
    logits = (q.view(b, hkv, g, t, d) @ k[:, :, None].transpose(-1, -2)) * d ** -0.5
    pos = torch.arange(n_ctx + t)
    logits = logits.masked_fill(pos[None, :] > (n_ctx + torch.arange(t))[:, None], float("-inf"))
    probs = logits.softmax(-1)  # [b, hkv, g, t, S]
    keep = torch.cat([kept, torch.ones(b, hkv, t, dtype=torch.bool)], -1)[:, :, None, None, :]
    assert got == pytest.approx(float((probs * keep).sum() / probs.sum()), rel=1e-5)
    assert runner.attention_mass_retained(ref, [torch.ones_like(kept)]) == pytest.approx(1.0)
    assert observe is not None


# ------------------------------------------------------------------------------------------- tasks
def test_sample_layout(books):
    tok = ByteTokenizer()
    s = tasks.make_sample(tok, 1200, seed=3, depths=(0.25, 0.75), continuation=10, span=32, cue=4, books=books)
    assert len(s["context"]) == 1200 and len(s["continuation"]) == 10
    start = s["copy_start"]
    assert s["context"][start:start + 32] == s["copy_span"]
    ctx_text = tok.decode(s["context"])
    for nd in s["needles"]:
        assert f"is {nd['answer']}." in ctx_text
        assert tok.decode(s["context"][nd["position"]:nd["position"] + 40]).startswith(" The secret code")
        # the copy span does not overlap a needle
        assert not (nd["position"] <= start < nd["position"] + 80 and start >= nd["position"])
    assert s == tasks.make_sample(tok, 1200, seed=3, depths=(0.25, 0.75), continuation=10, span=32, cue=4,
                                  books=books)
    with pytest.raises(ValueError, match="too short"):
        tasks.make_sample(tok, 100, seed=0, span=48, books=books)


# ------------------------------------------------------------------------------------------- the harness
SMALL = dict(contexts=[400], samples=1, continuation=8, span=16, cue=4, gen_tokens=6, depths=(0.5,))


def test_budget_one_reproduces_full_and_replay_is_exact(tiny, books):
    model, tok = tiny
    cfg = runner.BenchConfig(policies=["h2o"], budgets=[1.0, 0.1], **SMALL)
    rows = runner.run_quality(model, tok, cfg, books=books)
    full, same, small = rows
    assert full["policy"] == "full" and full["attention_mass"] == 1.0
    assert same["copy_nll"] == pytest.approx(full["copy_nll"], abs=1e-5)
    assert same["continuation_nll"] == pytest.approx(full["continuation_nll"], abs=1e-5)
    assert same["greedy_agreement"] == 1.0 and same["greedy_rouge_l"] == 1.0
    assert same["attention_mass"] == pytest.approx(1.0)
    assert small["kv_ratio"] < 0.2 and small["attention_mass"] < 0.99
    assert same["replayed_prefill"] and small["replayed_prefill"]
    # the replayed prefill gives the same figures as a real one
    sample = tasks.make_sample(tok, 400, seed=0, depths=(0.5,), continuation=8, span=16, cue=4, gen_tokens=6,
                               books=books)
    real = runner.run_one(model, tok, "h2o", 0.1, sample, {"copy", "continuation"})
    assert not real["replayed_prefill"]
    for key in ("copy_nll", "continuation_nll"):
        assert real[key] == pytest.approx(small[key], abs=1e-5)


def test_cli_bench_writes_table_csv_json_plots(tiny, books, tmp_path, monkeypatch, capsys):
    from kvpolicy import cli, data, models

    model, tok = tiny
    monkeypatch.setattr(models, "load", lambda path, **kw: (model, tok))
    monkeypatch.setattr(data, "austen_books", lambda: books)
    out = tmp_path / "res"
    rc = cli.main(["bench", "--model", str(tmp_path), "--policies", "snapkv", "streaming", "--budgets", "0.2", "0.5",
                   "--contexts", "300", "--span", "16", "--cue", "4", "--continuation", "6", "--gen-tokens", "5",
                   "--depths", "0.5", "--out", str(out)])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "copy NLL" in shown and "snapkv" in shown
    for name in ("samples.csv", "summary.csv", "results.json", "quality_300.png", "speed.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    payload = json.loads((out / "results.json").read_text())
    assert payload["meta"]["config"]["seed"] == 0 and payload["meta"]["machine"]["torch"] == torch.__version__
    pols = {(r["policy"], r["budget"]) for r in payload["summary"]}
    assert pols == {("full", 1.0), ("snapkv", 0.2), ("snapkv", 0.5), ("streaming", 0.2), ("streaming", 0.5)}
    for r in payload["summary"]:
        for key in ("copy_nll", "continuation_ppl", "passkey_acc", "attention_mass", "decode_ms_per_token"):
            assert math.isfinite(r[key]), (r["policy"], key)
    assert (out / "quality_300.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["bench", "--budgets", "1.5", "--out", str(out)]) == 2


def test_speed_measure_in_process(tiny, books, monkeypatch):
    from kvpolicy import data, models

    model, tok = tiny
    monkeypatch.setattr(models, "load_default", lambda *a, **kw: (model, tok))
    monkeypatch.setattr(data, "austen_books", lambda: books)
    plain = speed.measure({"policy": "plain", "n_ctx": 256, "decode": 4})
    snap = speed.measure({"policy": "snapkv", "budget": 0.25, "n_ctx": 256, "decode": 4})
    assert plain["kv_bytes"] == plain["kv_bytes_full"] > 0
    assert snap["kv_bytes_full"] == plain["kv_bytes"]
    assert snap["kv_bytes"] < 0.3 * snap["kv_bytes_full"]
    for r in (plain, snap):
        assert r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 and r["peak_rss_mb"] > 0
    assert snap["compress_s"] > 0
    info = speed.machine_info()
    assert info["cores"] >= 1 and info["torch"] == torch.__version__


def test_aggregate_and_markdown():
    rows = [{"policy": "h2o", "budget": 0.2, "context": 100, "seed": 0, "copy_nll": 1.0},
            {"policy": "h2o", "budget": 0.2, "context": 100, "seed": 1, "copy_nll": 3.0},
            {"policy": "full", "budget": 1.0, "context": 100, "seed": 0, "copy_nll": 0.5}]
    agg = report.aggregate(rows)
    assert [a["policy"] for a in agg] == ["full", "h2o"]
    assert agg[1]["copy_nll"] == 2.0 and agg[1]["n"] == 2
    md = report.markdown_table(agg)
    assert "| 100 | h2o | 0.2 | 2.000 |" in md


def test_isolated_speed_rows_join_quality_rows():
    from kvpolicy.bench import _merge_isolated

    rows = [{"policy": "h2o", "budget": 0.2, "context": 100, "copy_nll": 2.0},
            {"policy": "h2o", "budget": 0.2, "context": 100, "peak_rss_mb": 500.0, "prefill_peak_delta_mb": 20.0,
             "isolated": True},
            {"policy": "plain", "budget": 1.0, "context": 100, "peak_rss_mb": 480.0, "isolated": True},
            {"policy": "tova", "budget": 0.2, "context": 100, "error": "boom", "isolated": True}]
    merged = _merge_isolated(rows)
    assert [(r["policy"], r.get("peak_rss_mb")) for r in merged] == [("h2o", 500.0), ("plain", 480.0),
                                                                     ("tova", None)]
    assert merged[0]["copy_nll"] == 2.0 and merged[0]["prefill_peak_delta_mb"] == 20.0
    assert [a["policy"] for a in report.aggregate(merged)] == ["h2o", "plain"]  # error rows are left out


def test_attention_mass_on_a_mixed_layer_model_counts_the_compressed_layers(books):
    """Sliding-window layers (left as windows) are not counted; budget 1.0 retains all the mass."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    bench = runner.BenchConfig(policies=["snapkv"], budgets=[1.0, 0.1], metrics=["mass", "continuation"], **SMALL)
    full, same, small = runner.run_quality(model, ByteTokenizer(), bench, books=books)
    assert same["attention_mass"] == pytest.approx(1.0)
    assert 0.0 < small["attention_mass"] < 0.99
