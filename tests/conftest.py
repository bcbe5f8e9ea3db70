"""Test setup: 8 simulated CPU devices (must happen before jax initialises its backend)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags += " --xla_force_host_platform_device_count=8"
# Tests run tiny models whose time is all compilation: XLA's backend optimisations (fusion
# tuning, vectorisation) cost ~40% of it and buy nothing here. Benchmarks never set this.
if "xla_backend_optimization_level" not in flags:
  flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Modules with a `slow` test run first, each module's tests still together and in order.

  `pytest -n 2` hands tests out in collection order; a slow module that comes last keeps one
  worker busy alone at the end, or is split over both workers, each running its module fixtures
  (test_train_loop's reference training run) again.
  """
  del config
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)  # stable: the order otherwise kept
