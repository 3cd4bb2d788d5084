"""Test-wide JAX settings, applied before JAX starts.

Eight simulated CPU devices (tests choose the devices they use), and XLA's backend optimisation level 0:
tests compile many tiny programs, and this halves compile time. It changes the last bits of results (~1e-7 after
60 steps), so a test that compares bitwise against a subprocess must pass the subprocess the same XLA_FLAGS.
"""

import os

TEST_XLA_FLAGS = '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + TEST_XLA_FLAGS).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
