"""Fixtures shared by the test modules."""

import os

import pytest

from tests.fault_proxy import fault_proxy
from tests.gcs_emulator import gcs_emulator
from transforms.model_cache import CACHE_ENV


@pytest.fixture(autouse=True, scope="session")
def no_model_cache():
  """Every test builds its own models: with the cache of frozen and converted models
  (transforms/model_cache.py) on, a test would depend on the tests before it and on ~/.cache. The
  cache's own tests set a directory of their own; processes the tests start inherit this."""
  previous = os.environ.get(CACHE_ENV)
  os.environ[CACHE_ENV] = "off"
  yield
  if previous is None:
    os.environ.pop(CACHE_ENV, None)
  else:
    os.environ[CACHE_ENV] = previous


@pytest.fixture
def gcs_proxy():
  """A fresh emulator holding gs://test-bucket with a FaultProxy (tests/fault_proxy.py) in front of
  it: every gs:// request of the test (and of processes it starts) goes through the proxy, which
  counts them and injects the faults the test asks for. `proxy.bucket` is "gs://test-bucket"."""
  with gcs_emulator("test-bucket") as bucket, fault_proxy() as proxy:
    proxy.bucket = "gs://" + bucket
    yield proxy
