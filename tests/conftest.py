"""Test configuration: hypothesis profiles, threads, shared fixtures.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

* ``default`` -- derandomized (the same examples on every run, so CI is reproducible), sized so
  the whole suite stays within a few minutes on a 2-core machine running single-threaded.
* ``dev``     -- random examples, same size: for hunting bugs locally.
* ``thorough``-- random examples, 10x more: run occasionally (``-m "not slow"`` still applies).

``MODAN_TEST_EXAMPLES=<n>`` overrides ``max_examples`` of every hypothesis test
(``loss_cases.examples``).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # timings on a shared machine are noisy; the suite's total time is what counts
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.differing_executors],
    print_blob=True,
)
settings.register_profile("default", derandomize=True, **_COMMON)
settings.register_profile("dev", derandomize=False, **_COMMON)
settings.register_profile("thorough", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Without a GPU the Triton tests run the kernels in Triton's interpreter, which must be on before
# triton is first imported (importing torch._dynamo imports it): see tests/triton_setup.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep tests single-threaded unless the caller says otherwise (shared CI machines); the kernel's
# threading is exercised by the benchmark and by an explicit multi-thread test.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_fallback_warning_noise():
    """The reference-fallback warning is tested explicitly; elsewhere it is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="modan_ext: no compiled kernel")
        yield


@pytest.fixture(autouse=True)
def _default_dtype_is_float32():
    """A test that changes the default dtype must not leak it into the next one."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
