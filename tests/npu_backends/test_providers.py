"""Provider profiles, detection, strict no-fallback mode, and the provider reported back."""

import pytest

from npu_backends.providers import PROFILES, ProviderError, available, make_session, used_provider


def absent_provider() -> str:
    """A provider profile this machine lacks; skips the test where every profile's provider is present."""
    absent = next((name for name, ok in available().items() if not ok), None)
    if absent is None:
        pytest.skip("every provider profile is available on this machine: none is absent to test with")
    return absent


def test_every_profile_is_detected_and_the_cpu_is_always_there():
    found = available()
    assert set(found) == {"cpu", "qnn", "openvino", "vitisai", "coreml"} == set(PROFILES)
    assert found["cpu"]


def test_strict_mode_with_an_absent_provider_fails_clearly(graphs):
    absent = absent_provider()
    with pytest.raises(ProviderError, match=f"{PROFILES[absent].ep}.*strict forbids falling back"):
        make_session(graphs[1][0].path, absent, strict=True)


def test_without_strict_an_absent_provider_falls_back_and_says_so(graphs):
    absent = absent_provider()
    with pytest.warns(UserWarning, match="falling back to the CPU"):
        sess = make_session(graphs[1][0].path, absent)
    assert used_provider(sess) == "CPUExecutionProvider"


def test_strict_cpu_session_runs_on_the_cpu(graphs):
    assert used_provider(make_session(graphs[1][0].path, "cpu", strict=True)) == "CPUExecutionProvider"


def test_unknown_provider_is_named():
    with pytest.raises(ProviderError, match="unknown provider 'tpu'"):
        make_session("x.onnx", "tpu")
