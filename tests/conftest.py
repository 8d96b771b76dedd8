"""Test configuration: CPU, x64 off (the JAX default users run with), hypothesis profile.

`NPU_OPS_TEST_DEVICE=gpu|tpu` (set by `python -m npu_ops.tools.accelerator_check`) leaves the
platform to JAX and runs that platform's Pallas kernel natively (`implementations`)."""

import os
import sys

if not os.environ.get("NPU_OPS_TEST_DEVICE"):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import hypothesis  # noqa: E402

# Each example compiles new shapes: 6 derandomized examples per property in the default
# run; HYPOTHESIS_PROFILE=thorough for 200 random ones.
hypothesis.settings.register_profile(
    "ci", max_examples=6, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
