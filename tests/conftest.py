"""Test setup: kernels run under Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any test module
imports sdalign_rt. Every op test is parametrized over the backends present on this machine.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import sdalign_rt as sd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# CI derandomizes so a red run is reproducible; locally hypothesis explores. Example counts are kept small
# because the interpreted kernels cost milliseconds per launch.
# The backend fixture only selects a backend for the whole test, so sharing it across examples is intended.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                    HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

BACKENDS = sd.ops.available_backends(DEVICE)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test body with every op forced onto one backend."""
    with sd.ops.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


def pytest_report_header(config):
    from sdalign_rt import _ext

    cpp = "built" if _ext.cpp_available() else f"absent ({_ext.load_error})"
    return [f"sdalign_rt backends on {DEVICE}: {', '.join(BACKENDS)}; C++ extension {cpp}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]
