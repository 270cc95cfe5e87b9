"""For dataflow/nightly.sh: the latest dated run directory under a root that finished (has _SUCCESS.json).

Prints it (nothing when there is none) and exits 0; exits 3 when DAY's own run finished already.
One process for both answers: importing Beam costs seconds.
"""

import argparse
import datetime
import re
import sys

from apache_beam.io.filesystems import FileSystems

SUCCESS_FILE = "_SUCCESS.json"
_DATED = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ALREADY_FINISHED = 3


def finished_runs(root: str) -> dict:
  """date -> directory, for every ROOT/YYYY-MM-DD/ holding a _SUCCESS.json."""
  pattern = FileSystems.join(root.rstrip("/"), "*", SUCCESS_FILE)
  runs = {}
  for metadata in FileSystems.match([pattern])[0].metadata_list:
    directory = FileSystems.split(metadata.path)[0]
    name = FileSystems.split(directory)[1]
    if not _DATED.match(name):
      continue
    try:
      runs[datetime.date.fromisoformat(name)] = directory
    except ValueError:  # 2026-02-30 and the like: not one of ours
      continue
  return runs


def latest_before(root: str, day: datetime.date, runs=None):
  runs = finished_runs(root) if runs is None else runs
  earlier = [d for d in runs if d < day]
  return runs[max(earlier)] if earlier else None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("root", help="directory of dated runs (local or gs://)")
  parser.add_argument("day", type=datetime.date.fromisoformat, help="YYYY-MM-DD of the run about to start")
  args = parser.parse_args(argv)
  runs = finished_runs(args.root)
  if args.day in runs:
    return ALREADY_FINISHED
  previous = latest_before(args.root, args.day, runs)
  if previous:
    print(previous)
  return 0


if __name__ == "__main__":
  sys.exit(main())
