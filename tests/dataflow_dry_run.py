"""The Dataflow job graph of a pipeline, built offline (DataflowRunner --dry_run).

Why this works with no credentials and no network (apache-beam 2.77):

* ``--dry_run=True`` makes ``DataflowRunner.run_pipeline`` return right after it has
  built ``runner.proto_pipeline`` and the ``apiclient.Job`` shell, before it creates
  ``DataflowApplicationClient`` (credentials, Dataflow API, GCS staging). It also makes
  option validation skip the soft-delete check of the gs:// temp/staging bucket, the
  one GCS call validation would otherwise make.
* ``--temp_location`` must be a well-formed gs:// path: without it validation tries to
  create a default bucket through the network.
* Artifacts (pickled main session, ``pip freeze`` output, a ``--setup_file`` sdist)
  are prepared in a local temp dir and only referenced by path in the proto.

The proto is what Dataflow would receive as the portable pipeline. The v1b3 job
environment (worker pools, ``--experiments``, ``--dataflow_service_options``) is only
assembled at submission time, so a dry run says nothing about those.
"""

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import Pipeline

DRY_RUN_ARGS = (
    "--runner=DataflowRunner",
    "--dry_run=True",
    "--project=my-project-123",
    "--region=us-central1",
    "--temp_location=gs://bucket/tmp",
    "--job_name=test-job",
)


def build_dataflow_proto(build_fn, extra_args=()):
  """Runs `build_fn(pipeline)` under a Dataflow dry run; returns the Pipeline proto.

  `extra_args` come after the defaults, so they win for single-valued options.
  Sources built inside `build_fn` that match files at construction time (e.g.
  ``ReadFromParquet("gs://...")``) must be given ``validate=False``, or they reach
  for GCS.
  """
  pipeline = Pipeline(options=PipelineOptions([*DRY_RUN_ARGS, *extra_args]))
  build_fn(pipeline)
  pipeline.run()
  # run() hands the runner a copy rebuilt from the runner API, so the graph the
  # runner saw lives on the runner, not on `pipeline`.
  return pipeline.runner.proto_pipeline


def resource_hints_by_transform(proto):
  """unique_name -> resource hints (URN -> bytes) of every transform in `proto`.

  Beam has no hint field on PTransform: a hinted transform (composite and all its
  sub-transforms) is moved to a copy of the default environment that carries the
  hints, so a transform's hints are those of `components.environments[environment_id]`.
  Runner-native primitives (GroupByKey, Impulse, Flatten) have no environment: {}.
  """
  environments = proto.components.environments
  return {
      t.unique_name: (
          dict(environments[t.environment_id].resource_hints)
          if t.environment_id else {})
      for t in proto.components.transforms.values()
  }
