"""OpenTelemetry tracing: spans per (layer, event), metrics, the JSON-lines trace and ``trace-summary``.

Spans and metrics go to the SDK's in-memory exporter and reader, installed for kvpolicy only with
:func:`kvpolicy.tracing.set_providers` (via ``telemetry_setup.in_memory()``), so each test gets fresh
providers; the default path through the *global* providers is tested in a subprocess (a global provider
can be set only once per process).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import make_tiny_llama
from opentelemetry.trace import StatusCode

import kvpolicy
from kvpolicy import cli, telemetry_setup, tracing
from kvpolicy.policy import CompressionContext, Scorer

N_SMOL_LAYERS = 30


@pytest.fixture
def tel():
    t = telemetry_setup.in_memory()
    yield t
    t.shutdown()
    assert tracing.get_providers() == (None, None)


def _by_name(spans: list[Any], name: str) -> list[Any]:
    return [s for s in spans if s.name == name]


def _metric(points: list[dict[str, Any]], name: str, phase: str, key: str = "value") -> float:
    return sum(p[key] for p in points if p["name"] == name and p["attributes"]["kvpolicy.phase"] == phase)


def _assert_metrics_match(tel: telemetry_setup.Telemetry, spans: list[Any], phase: str) -> None:
    ok = [s for s in spans if s.attributes["kvpolicy.phase"] == phase and s.status.status_code != StatusCode.ERROR]
    points = tel.metric_points()
    assert _metric(points, "kvpolicy.tokens_dropped", phase) == sum(s.attributes["kvpolicy.tokens_dropped"] for s in ok)
    assert _metric(points, "kvpolicy.tokens_merged", phase) == sum(s.attributes["kvpolicy.tokens_merged"] for s in ok)
    assert _metric(points, "kvpolicy.compress.duration", phase, "count") == len(ok)
    assert _metric(points, "kvpolicy.compress.duration", phase, "sum") == pytest.approx(
        sum(s.attributes["kvpolicy.seconds"] for s in ok))


# --------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_snapkv_prefill_one_span_per_layer(smollm2, smol_passage, tel):
    model, _ = smollm2
    ids = smol_passage[:, :400]
    n = ids.shape[1]
    policy = kvpolicy.load_policy("snapkv", budget=0.2)
    budget = int(policy.layer_budget(0, N_SMOL_LAYERS, torch.tensor([n])).total)
    assert budget == int(n * 0.2)
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        model(input_ids=ids, cache=cache, use_cache=True)
    spans = tel.finished_spans()
    (gen,) = _by_name(spans, "kvpolicy.generate")
    comp = _by_name(spans, "kvpolicy.compress")
    assert len(comp) == N_SMOL_LAYERS
    assert sorted(s.attributes["kvpolicy.layer"] for s in comp) == list(range(N_SMOL_LAYERS))
    for s in comp:
        a = s.attributes
        assert s.parent is not None and s.parent.span_id == gen.context.span_id
        assert s.context.trace_id == gen.context.trace_id
        assert (a["kvpolicy.phase"], a["kvpolicy.event"], a["kvpolicy.policy"]) == ("prefill", "compress", "snapkv")
        assert (a["kvpolicy.scorer"], a["kvpolicy.merger"]) == ("snapkv", "none")
        assert a["kvpolicy.tokens_in"] == n
        assert a["kvpolicy.tokens_kept"] == budget
        assert a["kvpolicy.tokens_dropped"] == n - budget
        assert a["kvpolicy.tokens_merged"] == 0
        assert (a["kvpolicy.image_tokens_in"], a["kvpolicy.image_tokens_kept"]) == (0, 0)
        # 3 KV heads x 64 dims x fp32 x (K and V) per token
        assert a["kvpolicy.bytes_before"] == n * 3 * 64 * 4 * 2
        assert a["kvpolicy.bytes_after"] == budget * 3 * 64 * 4 * 2
        assert s.start_time >= gen.start_time and s.end_time <= gen.end_time
    # the generate span carries the cache's final report, row for row
    rows = tracing.report_rows(dict(gen.attributes))
    assert rows == cache.report().as_dicts()
    _assert_metrics_match(tel, comp, "prefill")
    assert _metric(tel.metric_points(), "kvpolicy.tokens_dropped", "prefill") == N_SMOL_LAYERS * (n - budget)


@pytest.mark.slow
def test_cli_run_jsonl_then_trace_summary(smollm2, austen, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli._MODELS, None, smollm2)  # reuse the session model: no second load
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(austen[5000:6500], encoding="utf-8")
    trace_file = tmp_path / "out" / "trace.jsonl"
    rc = cli.main(["run", "--policy", "snapkv", "--budget", "0.2", "--prompt-file", str(prompt),
                   "--max-new-tokens", "2", "--trace", f"jsonl:{trace_file}"])
    assert rc == 0
    run_out = capsys.readouterr().out
    assert tracing.get_providers() == (None, None)  # the CLI's setup is gone after the command

    records = [json.loads(line) for line in trace_file.read_text().splitlines()]
    spans = [r for r in records if r["type"] == "span"]
    assert sum(r["name"] == "kvpolicy.compress" for r in spans) == N_SMOL_LAYERS
    (metrics,) = [r for r in records if r["type"] == "metrics"]  # one export, at exit
    found = {m["name"]: m["data"]["data_points"] for rm in metrics["data"]["resource_metrics"]
             for sm in rm["scope_metrics"] for m in sm["metrics"]}
    assert [p["value"] for p in found["kvpolicy.tokens_dropped"]] == [
        sum(r["attributes"]["kvpolicy.tokens_dropped"] for r in spans if r["name"] == "kvpolicy.compress")]
    assert [p["count"] for p in found["kvpolicy.compress.duration"]] == [N_SMOL_LAYERS]

    assert cli.main(["trace-summary", str(trace_file)]) == 0
    summary = capsys.readouterr().out
    table = [ln for ln in summary.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert [int(ln.split()[0]) for ln in table] == list(range(N_SMOL_LAYERS))
    # the same table as `kvpolicy run` printed (same data, same rendering)
    start = run_out.index("kvpolicy cache report")
    run_table = run_out[start:].splitlines()[: N_SMOL_LAYERS + 3]
    assert summary.splitlines()[: N_SMOL_LAYERS + 3] == run_table


# --------------------------------------------------------------------------------------------- tiny models
def test_rolling_decode_gives_compact_spans(tel):
    model = make_tiny_llama(layers=2)
    prompt, new, every = 100, 45, 16
    ids = torch.randint(3, 128, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), kvpolicy.compress(model, "h2o-rolling", budget=0.2) as cache:
        model.generate(input_ids=ids, cache=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    spans = tel.finished_spans()
    (gen,) = _by_name(spans, "kvpolicy.generate")
    comp = _by_name(spans, "kvpolicy.compress")
    decode = [s for s in comp if s.attributes["kvpolicy.phase"] == "decode"]
    assert len(comp) - len(decode) == 2  # one prefill span per layer
    assert decode, "a rolling decode rule must compact while decoding"
    for s in decode:
        a = s.attributes
        assert s.parent.span_id == gen.context.span_id
        assert a["kvpolicy.event"] == "compact"
        # compaction fires as soon as the layer holds `every` entries more than its budget
        assert a["kvpolicy.tokens_in"] - a["kvpolicy.tokens_kept"] == every
        assert a["kvpolicy.tokens_dropped"] == every
    # per layer: 20 entries after prefill; decode step j sees 19 + j entries and a budget of
    # floor((100 + j) / 5): it compacts at j = 21 (40 entries -> 24), then at j = 41 (44 entries -> 28)
    for layer in (0, 1):
        kept = [s.attributes["kvpolicy.tokens_kept"] for s in decode if s.attributes["kvpolicy.layer"] == layer]
        assert kept == [24, 28]
    assert [r.events for r in cache.report().layers] == [3, 3]
    _assert_metrics_match(tel, comp, "decode")
    _assert_metrics_match(tel, comp, "prefill")


class _FailingScorer(Scorer):
    """Raises while scoring (tests that failures are traced)."""

    name: ClassVar[str] = "failing-for-tracing-test"

    def score(self, ctx: CompressionContext) -> torch.Tensor:
        raise RuntimeError(f"scorer failed on layer {ctx.layer_idx}")


class _FigureScorer(Scorer):
    """Key norms; reports figures of its own (tests that they reach the span)."""

    name: ClassVar[str] = "figures-for-tracing-test"

    def score(self, ctx: CompressionContext) -> torch.Tensor:
        norms = ctx.key_norms()
        ctx.figures.update(mean_norm=float(norms.mean()), per_head=ctx.valid[:, :, 0].sum(0), note="hi",
                           tokens_in=-1, raw=norms)
        return norms


class _TestPlugin:
    @kvpolicy.hookimpl
    def kvpolicy_components(self) -> list[type]:
        return [_FailingScorer, _FigureScorer]


def test_exception_inside_policy_is_recorded_and_reraised(tel):
    from kvpolicy.registry import register_plugin, unregister_plugin

    register_plugin(_TestPlugin(), "failing-tracing-test")
    try:
        policy = kvpolicy.load_policy({"name": "failing", "budget": {"ratio": 0.2, "sink": 0},
                                       "scorer": {"name": _FailingScorer.name}})
        model = make_tiny_llama(layers=2)
        ids = torch.randint(3, 128, (1, 50), generator=torch.Generator().manual_seed(1))
        with pytest.raises(RuntimeError, match="scorer failed on layer 0"):
            with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
                model(input_ids=ids, cache=cache, use_cache=True)
    finally:
        unregister_plugin("failing-tracing-test")
    spans = tel.finished_spans()
    (gen,) = _by_name(spans, "kvpolicy.generate")
    (comp,) = _by_name(spans, "kvpolicy.compress")  # layer 0 failed, layer 1 never ran
    assert comp.parent.span_id == gen.context.span_id
    assert comp.status.status_code == StatusCode.ERROR and "scorer failed" in comp.status.description
    (exc,) = [e for e in comp.events if e.name == "exception"]
    assert exc.attributes["exception.type"] == "RuntimeError"
    assert exc.attributes["exception.message"] == "scorer failed on layer 0"
    a = comp.attributes  # what was known before the failure is kept
    assert (a["kvpolicy.layer"], a["kvpolicy.phase"], a["kvpolicy.scorer"]) == (0, "prefill", _FailingScorer.name)
    assert a["kvpolicy.tokens_in"] == 50 and a["kvpolicy.bytes_before"] > 0
    assert a["kvpolicy.seconds"] > 0
    assert not {"kvpolicy.tokens_kept", "kvpolicy.tokens_dropped", "kvpolicy.bytes_after"} & set(a)  # not known
    assert gen.status.status_code == StatusCode.ERROR
    assert tracing.report_rows(dict(gen.attributes))[0]["events"] == 0  # the failed event is not reported
    assert [p for p in tel.metric_points() if p["name"] == "kvpolicy.tokens_dropped"] == []


def test_policy_figures_become_span_attributes(tel):
    from kvpolicy.registry import register_plugin, unregister_plugin

    register_plugin(_TestPlugin(), "figures-tracing-test")
    try:
        policy = kvpolicy.load_policy({"name": "figures", "budget": {"ratio": 0.5, "sink": 0},
                                       "scorer": {"name": _FigureScorer.name}})
        model = make_tiny_llama(layers=2, heads=4, kv_heads=2)
        with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
            model(input_ids=torch.randint(3, 128, (1, 20)), cache=cache, use_cache=True)
    finally:
        unregister_plugin("figures-tracing-test")
    comp = _by_name(tel.finished_spans(), "kvpolicy.compress")
    assert len(comp) == 2
    for s, layer in zip(comp, cache.layers, strict=True):
        a = s.attributes
        assert a["kvpolicy.mean_norm"] > 0 and a["kvpolicy.note"] == "hi"
        assert list(a["kvpolicy.per_head"]) == [1, 1]  # a 1-d tensor becomes a list
        assert a["kvpolicy.tokens_in"] == 20  # a figure never overrides a field
        assert "kvpolicy.raw" not in a  # a [B, H, S] tensor is not an attribute
        assert layer.events[0].figures["note"] == "hi"  # the report's event holds them too


@pytest.fixture
def fresh_otel_globals():
    """Unset global OpenTelemetry providers for one test, restored afterwards (what the OpenTelemetry
    test utilities do: a global provider can otherwise be set only once per process)."""
    from opentelemetry import trace
    from opentelemetry.metrics import _internal as metrics_internal
    from opentelemetry.util._once import Once

    names_t = ("_TRACER_PROVIDER", "_TRACER_PROVIDER_SET_ONCE", "_PROXY_TRACER_PROVIDER")
    names_m = ("_METER_PROVIDER", "_METER_PROVIDER_SET_ONCE", "_PROXY_METER_PROVIDER")
    saved_t = [getattr(trace, n) for n in names_t]
    saved_m = [getattr(metrics_internal, n) for n in names_m]
    for mod, names, proxy in ((trace, names_t, trace.ProxyTracerProvider()),
                              (metrics_internal, names_m, metrics_internal._ProxyMeterProvider())):
        for n, v in zip(names, (None, Once(), proxy), strict=True):
            setattr(mod, n, v)
    tracing.set_providers(None, None)  # drop kvpolicy's cached tracer and instruments
    try:
        yield
    finally:
        for n, v in zip(names_t, saved_t, strict=True):
            setattr(trace, n, v)
        for n, v in zip(names_m, saved_m, strict=True):
            setattr(metrics_internal, n, v)
        tracing.set_providers(None, None)


def test_default_global_providers_noop_then_recording(fresh_otel_globals):
    """Without an SDK nothing records; once the application sets the global providers, kvpolicy's
    tracer and meter (created before) follow them."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    model = make_tiny_llama(layers=3)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))

    def run() -> bool:
        with torch.inference_mode(), kvpolicy.compress(model, "snapkv", budget=0.25) as cache:
            model(input_ids=ids, cache=cache, use_cache=True)
            return trace.get_current_span().is_recording()

    assert run() is False  # no SDK: the generate span is a non-recording no-op
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tp)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    assert run() is True
    names = [s.name for s in exporter.get_finished_spans()]
    assert (names.count("kvpolicy.compress"), names.count("kvpolicy.generate")) == (3, 1)
    dropped = [p.value for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics if m.name == "kvpolicy.tokens_dropped" for p in m.data.data_points]
    assert dropped == [3 * (40 - 10)]


def _tiny_trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.jsonl"
    model = make_tiny_llama(layers=2)
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    with telemetry_setup.setup(f"jsonl:{path}"):
        with torch.inference_mode(), kvpolicy.compress(model, "snapkv", budget=0.2) as cache:
            model(input_ids=ids, cache=cache, use_cache=True)
    return path


def test_trace_summary_without_report_aggregates_compress_spans(tmp_path):
    path = _tiny_trace(tmp_path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    full = tracing.trace_reports(tracing.read_trace(str(path)))
    (report, failed), = full
    assert failed == [] and [(r.tokens_seen, r.tokens_kept, r.events) for r in report.layers] == [(100, 20, 1)] * 2
    # drop the generate span: the per-layer rows are rebuilt from the compress spans alone
    path.write_text("".join(json.dumps(r) + "\n" for r in lines if r.get("name") != "kvpolicy.generate"))
    ((orphan, _),) = tracing.trace_reports(tracing.read_trace(str(path)))
    assert orphan.policy == "snapkv"
    assert [(r.layer, r.tokens_seen, r.tokens_kept, r.bytes_now) for r in orphan.layers] == \
        [(r.layer, r.tokens_seen, r.tokens_kept, r.bytes_now) for r in report.layers]


def test_trace_summary_errors(tmp_path, capsys):
    assert cli.main(["trace-summary", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "span"}\nnot json\n')
    assert cli.main(["trace-summary", str(bad)]) == 2
    assert "bad.jsonl:2: not a JSON line" in capsys.readouterr().err


def test_console_exporter(tmp_path):
    buf = io.StringIO()
    model = make_tiny_llama(layers=2)
    with telemetry_setup.setup("console", stream=buf):
        with torch.inference_mode(), kvpolicy.compress(model, "streaming", budget=0.5) as cache:
            model(input_ids=torch.randint(3, 128, (1, 30)), cache=cache, use_cache=True)
    text = buf.getvalue()
    assert text.count('"name": "kvpolicy.compress"') == 2 and '"kvpolicy.tokens_kept": 15' in text
    assert "kvpolicy.tokens_dropped" in text  # the metrics, exported at shutdown


@pytest.mark.parametrize("spec, message", [
    ("jsonl", "jsonl needs a file path"),
    ("zipkin", "allowed: console, jsonl:PATH, otlp"),
])
def test_bad_trace_spec(spec, message, capsys):
    assert cli.main(["run", "--policy", "snapkv", "--prompt-file", "nowhere.txt", "--trace", spec]) == 2
    assert message in capsys.readouterr().err


def test_otlp_missing_exporter_is_a_clear_error(monkeypatch, capsys):
    for mod in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                "opentelemetry.exporter.otlp.proto.http.metric_exporter"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as when the extra is not installed
    assert cli.main(["run", "--policy", "snapkv", "--prompt-file", "nowhere.txt", "--trace", "otlp"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'kvpolicy[otlp]'" in err and "opentelemetry-exporter-otlp-proto-http" in err
    assert tracing.get_providers() == (None, None)


def test_event_attributes_and_figures():
    ev = tracing.CompressionEvent(layer=3, phase="decode", policy="p", scorer="s", merger="m", event="fixed-point",
                                  tokens_in=10, tokens_kept=6, tokens_merged=3, tokens_dropped=1,
                                  figures={"merge_sets": [2, 1], "ratio": torch.tensor(0.5), "layer": 99,
                                           "nested": {"a": 1}, "mixed": [1, "a"], "sizes": torch.tensor([1, 2])})
    a = ev.attributes()
    assert a["kvpolicy.layer"] == 3  # a figure never overrides a field
    assert a["kvpolicy.event"] == "fixed-point" and a["kvpolicy.tokens_merged"] == 3
    assert a["kvpolicy.merge_sets"] == [2, 1] and a["kvpolicy.ratio"] == 0.5 and a["kvpolicy.sizes"] == [1, 2]
    assert "kvpolicy.nested" not in a and "kvpolicy.mixed" not in a and "kvpolicy.figures" not in a


def test_tiny_llava_lookm_reports_image_tokens(tel):
    """LOOK-M on a tiny LLaVA: 2 text + 64 image + 10 text tokens, budget 0.2 -> 15 entries per layer; the
    text prior keeps all 12 text tokens, so 3 image entries stay and the other 61 images are merged."""
    pytest.importorskip("kvpolicy_lookm")
    from conftest import make_tiny_llava

    img_id, n_img = 100, 64
    model = make_tiny_llava(32, n_img, img_id)
    g = torch.Generator().manual_seed(4)
    ids = torch.cat([torch.randint(1, 100, (1, 2), generator=g), torch.full((1, n_img), img_id),
                     torch.randint(1, 100, (1, 10), generator=g)], 1)
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    with torch.inference_mode(), kvpolicy.compress(model, "lookm-pivot", budget=0.2) as cache:
        model(input_ids=ids, pixel_values=pixels, cache=cache, use_cache=True)
    comp = _by_name(tel.finished_spans(), "kvpolicy.compress")
    assert sorted(s.attributes["kvpolicy.layer"] for s in comp) == [0, 1]
    for s in comp:
        a = s.attributes
        layer = cache.layers[a["kvpolicy.layer"]]
        assert (a["kvpolicy.tokens_in"], a["kvpolicy.image_tokens_in"]) == (76, n_img)
        assert (a["kvpolicy.tokens_kept"], a["kvpolicy.image_tokens_kept"]) == (15, 3)
        assert int((layer.valid & layer.is_image)[0, 0].sum()) == 3  # the span agrees with the cache
        assert (a["kvpolicy.tokens_merged"], a["kvpolicy.tokens_dropped"]) == (61, 0)
        assert a["kvpolicy.merger"] == "pivotal"
