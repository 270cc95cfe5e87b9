"""Reading resource hints out of a Dataflow job graph built offline (DataflowRunner --dry_run; tests/test_dataflow.py builds it).

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
