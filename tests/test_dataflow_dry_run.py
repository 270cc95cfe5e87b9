"""Where Dataflow would see the GPU resource hint, checked on a dry-run job graph."""

import socket

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.internal.gcp import auth
from apache_beam.io.parquetio import WriteToParquetBatched
from apache_beam.portability.api import beam_runner_api_pb2

from tests.dataflow_dry_run import build_dataflow_proto
from tests.dataflow_dry_run import resource_hints_by_transform

ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
ACCELERATOR_URN = "beam:resources:accelerator:v1"
MIN_RAM_URN = "beam:resources:min_ram_bytes:v1"
SCHEMA = pa.schema([("uri", pa.string()), ("n", pa.int64())])


class ReadDecodeEmbed(beam.PTransform):
  def expand(self, paths):
    return (
        paths
        | "Decode" >> beam.Map(lambda p: (p, len(p)))
        | "Embed" >> beam.Map(
            lambda kv: pa.Table.from_pydict({"uri": [kv[0]], "n": [kv[1]]}, schema=SCHEMA)))


def toy_pipeline(p):
  _ = (
      p
      | "Create" >> beam.Create(["gs://b/a.jpg", "gs://b/b.jpg"])
      | "Reshuffle" >> beam.Reshuffle()
      | "ReadDecodeEmbed" >> ReadDecodeEmbed().with_resource_hints(
          accelerator=ACCELERATOR, min_ram="16GB")
      | "Write" >> WriteToParquetBatched(
          "gs://bucket/out/embeddings", schema=SCHEMA, file_name_suffix=".parquet"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """Fails the test on any credential lookup or non-loopback connection."""
  def no_credentials(cls, options):
    raise AssertionError("dry run looked up Google credentials")

  real_connect = socket.socket.connect

  def loopback_only(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
        "127.0.0.1", "::1", "localhost"):
      raise AssertionError("dry run connected to %r" % (address,))
    return real_connect(sock, address)

  monkeypatch.setattr(auth._Credentials, "get_service_credentials",
                      classmethod(no_credentials))
  monkeypatch.setattr(socket.socket, "connect", loopback_only)


def _container_images(proto):
  return {
      env_id: beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
      for env_id, env in proto.components.environments.items()}


def test_accelerator_hint_only_on_composite():
  proto = build_dataflow_proto(toy_pipeline)
  hints = resource_hints_by_transform(proto)
  transforms = {t.unique_name: t for t in proto.components.transforms.values()}

  composite = transforms["ReadDecodeEmbed"]
  by_id = proto.components.transforms
  assert sorted(by_id[s].unique_name for s in composite.subtransforms) == [
      "ReadDecodeEmbed/Decode", "ReadDecodeEmbed/Embed"]
  for name in ("ReadDecodeEmbed", "ReadDecodeEmbed/Decode", "ReadDecodeEmbed/Embed"):
    assert hints[name] == {
        ACCELERATOR_URN: ACCELERATOR.encode(),
        # Decimal: "16GB" is 16 * 10**9 bytes; "16GiB" would be 16 * 2**30.
        MIN_RAM_URN: b"16000000000",
    }, name

  assert not {n: h for n, h in hints.items() if h and not n.startswith("ReadDecodeEmbed")}
  leaves_elsewhere = [
      n for n, t in transforms.items()
      if not t.subtransforms and n.split("/")[0] in ("Create", "Reshuffle", "Write")]
  assert len(leaves_elsewhere) > 10
  # One environment per distinct hint set; both run the same SDK image.
  assert len(proto.components.environments) == 2
  assert len(set(_container_images(proto).values())) == 1


@pytest.mark.parametrize("extra", [
    ["--experiments=no_use_multiple_sdk_containers"],
    ["--dataflow_service_options=worker_accelerator=" + ACCELERATOR],
    ["--no_auth"],
], ids=["no_use_multiple_sdk_containers", "worker_accelerator", "no_auth"])
def test_submission_only_options_leave_graph_unchanged(extra):
  # These shape the v1b3 job environment built at submission, not the graph.
  base = resource_hints_by_transform(build_dataflow_proto(toy_pipeline))
  assert resource_hints_by_transform(build_dataflow_proto(toy_pipeline, extra)) == base


def test_sdk_container_image_goes_on_every_environment():
  image = "us-central1-docker.pkg.dev/my-project-123/images/embed:1"
  proto = build_dataflow_proto(toy_pipeline, ["--sdk_container_image=" + image])
  assert set(_container_images(proto).values()) == {image}
  assert resource_hints_by_transform(proto)["ReadDecodeEmbed/Embed"][ACCELERATOR_URN]


def test_setup_file_is_built_locally(tmp_path):
  (tmp_path / "setup.py").write_text(
      "from setuptools import setup\nsetup(name='toy', version='0.1', py_modules=[])\n")
  proto = build_dataflow_proto(toy_pipeline, ["--setup_file=%s" % (tmp_path / "setup.py")])
  for env in proto.components.environments.values():
    staged = {
        beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name
        for d in env.dependencies}
    assert "workflow.tar.gz" in staged
