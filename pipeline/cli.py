"""The `embed-images` console script (and `python -m pipeline`): start-up without the cyclic GC.

Start-up is one thread of Python on the critical path: importing Beam, TensorFlow and Keras
makes a few hundred thousand long-lived objects, and the cyclic GC walks all of them in each
full collection it triggers on the way (six, ~0.9 s in all, in a 1024-image local run), and once
more at interpreter exit (~1.3 s). So the imports run with the GC paused, what they made is
moved to the permanent generation (`gc.freeze`), and the heap is frozen again before exit.
`pipeline.main.run` itself, which tests and other programs call in-process, leaves the GC alone.
"""

import contextlib
import gc
import logging
import sys


@contextlib.contextmanager
def startup_without_gc():
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    gc.freeze()
    if enabled:
      gc.enable()


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  logging.getLogger().setLevel(logging.WARNING)
  with startup_without_gc():
    from pipeline.main import info_request, run
    known, _ = info_request(argv)
    if not (known.list_backbones or known.help):
      import keras  # noqa: F401  (and TensorFlow: every job's launch checks and local worker need them)
  status = run(argv)
  gc.freeze()  # nothing left to collect that matters: skip the final full collection at exit
  sys.exit(status)


if __name__ == "__main__":
  main()
