"""The plugin keeps every kvpolicy promise: one line per component and preset (kvpolicy's invariant kit)."""

from kvpolicy.testing import check_component, check_preset


def test_value_norm_scorer_keeps_kvpolicy_invariants():
    check_component("scorer", "value-norm")


def test_value_norm_window_variant_keeps_kvpolicy_invariants():
    check_component("scorer", "value-norm", {"window": 8, "p": 2}, model=False)


def test_vatp_preset_keeps_kvpolicy_invariants():
    check_preset("vatp")
