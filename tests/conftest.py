"""Fixtures shared by the test modules."""

import pytest

from tests.fault_proxy import fault_proxy
from tests.gcs_emulator import gcs_emulator


@pytest.fixture
def gcs_proxy():
  """A fresh emulator holding gs://test-bucket with a FaultProxy (tests/fault_proxy.py) in front of
  it: every gs:// request of the test (and of processes it starts) goes through the proxy, which
  counts them and injects the faults the test asks for. `proxy.bucket` is "gs://test-bucket"."""
  with gcs_emulator("test-bucket") as bucket, fault_proxy() as proxy:
    proxy.bucket = "gs://" + bucket
    yield proxy
