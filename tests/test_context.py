"""One context, many questions: kvpolicy.CompressedContext, kvpolicy.pipeline and `kvpolicy run --questions-file`."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.context import split_prompt
from kvpolicy.errors import CacheUsageError

QUESTIONS = ["Who is speaking?", "What is the mood of the passage?"]


@pytest.fixture(scope="module")
def passage(smollm2):
    from kvpolicy import data

    return data.austen_passage(smollm2[1], 400)


def test_split_prompt_renders_the_same_chat_prompt(smollm2, passage):
    tok = smollm2[1]
    head, tail = split_prompt(tok, passage, QUESTIONS[0])
    prompt = tok.apply_chat_template([{"role": "user", "content": passage + "\n\n" + QUESTIONS[0]}], tokenize=False,
                                     add_generation_prompt=True)
    assert tok.decode(head + tail) == prompt
    assert tok.decode(head).endswith(passage) and QUESTIONS[0] in tok.decode(tail)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["snapkv", "adakv-snapkv"])
def test_many_questions_equal_a_fresh_compression_each_and_compress_once(smollm2, passage, preset):
    model, tok = smollm2
    with kvpolicy.CompressedContext(model, tok, passage, preset, budget=0.3) as ctx:
        answers = [ctx.ask(q, max_new_tokens=8) for q in QUESTIONS + QUESTIONS[:1]]
        assert all(len(layer.events) == 1 for layer in ctx.cache.layers)  # the context's one compression
        n = len(ctx.context_ids)
        assert ctx.cache.get_seq_length() == n  # rolled back after each answer
    assert answers[2].tokens == answers[0].tokens  # asking again gives the same answer
    for q, a in zip(QUESTIONS, answers):
        with kvpolicy.CompressedContext(model, tok, passage, preset, budget=0.3) as fresh:
            assert fresh.ask(q, max_new_tokens=8).tokens == a.tokens, q
    # the question is read, not compressed: the same as generating over the compressed context by hand
    head, tail = split_prompt(tok, passage, QUESTIONS[1])
    with torch.inference_mode(), kvpolicy.compress(model, preset, budget=0.3) as cache:
        model(input_ids=torch.tensor([head]), cache=cache)
        cache.compressing = False
        ids = torch.tensor([head + tail])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=8,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    assert out[0, ids.shape[1]:].tolist() == answers[1].tokens


@pytest.mark.slow
def test_pipeline_call_forms(smollm2, passage):
    model, tok = smollm2
    pipe = kvpolicy.pipeline(model, tok)
    one = pipe(passage, question=QUESTIONS[0], policy="snapkv", budget=0.3, max_new_tokens=6)
    many = pipe(passage, questions=QUESTIONS, policy="snapkv", budget=0.3, max_new_tokens=6)
    assert many["answers"][0] == one["answer"] and len(many["answers"]) == 2
    assert many["report"].bytes_now < 0.35 * many["report"].bytes_full
    with pytest.raises(ValueError, match="exactly one of question"):
        pipe(passage, question="a", questions=["b"])


@pytest.mark.slow
def test_a_closed_context_refuses_questions(smollm2, passage):
    model, tok = smollm2
    ctx = kvpolicy.CompressedContext(model, tok, passage, "streaming", budget=0.5)
    ctx.close()
    with pytest.raises(CacheUsageError, match="closed"):
        ctx.ask("Who?")
    with torch.inference_mode():  # the model is restored: plain attention again
        model(input_ids=torch.tensor([ctx.context_ids[:8]]))


@pytest.mark.slow
def test_cli_questions_file(smollm2, passage, tmp_path, capsys):
    from kvpolicy import cli

    (tmp_path / "ctx.txt").write_text(passage)
    (tmp_path / "q.txt").write_text("\n".join(QUESTIONS) + "\n\n")
    assert cli.main(["run", "--policy", "snapkv", "--budget", "0.3", "--prompt-file", str(tmp_path / "ctx.txt"),
                     "--questions-file", str(tmp_path / "q.txt"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "compressed once" in out and "[2] answer:" in out and "[3]" not in out
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit, match="holds no question"):
        cli.main(["run", "--policy", "snapkv", "--prompt-file", str(tmp_path / "ctx.txt"), "--questions-file",
                  str(tmp_path / "empty.txt")])


@pytest.mark.slow
def test_many_questions_on_a_mixed_layer_model(gemma3):
    """Gemma-3-270M (sliding-window layers, an explicit <bos>): the same answers as a fresh compression each,
    its windows rolled back with the rest of the cache."""
    from kvpolicy import data

    model, tok = gemma3
    passage = data.austen_passage(tok, 700)
    head, _ = split_prompt(tok, passage, QUESTIONS[0])
    assert head[0] == tok.bos_token_id and len(head) > 600  # longer than the 512-token windows
    with kvpolicy.CompressedContext(model, tok, passage, "snapkv", budget=0.3) as ctx:
        answers = [ctx.ask(q, max_new_tokens=6) for q in QUESTIONS]
        assert all(len(layer.events) == 1 for layer in ctx.cache.layers)  # a compression or a window trim
        assert sum(layer.is_sliding for layer in ctx.cache.layers) == 15
    for q, a in zip(QUESTIONS, answers):
        with kvpolicy.CompressedContext(model, tok, passage, "snapkv", budget=0.3) as fresh:
            assert fresh.ask(q, max_new_tokens=6).tokens == a.tokens, q
