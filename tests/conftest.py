"""Test-wide settings: fp32 matmuls at full precision (parity), 8 host devices for mesh tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_default_matmul_precision", "highest")
