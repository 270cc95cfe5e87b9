"""The console script's own output: third-party start-up noise held back unless --verbose asks for it."""

import os
import pathlib
import subprocess
import sys

import pytest

from pipeline import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"

# `python -m pipeline ARGS` as a machine without the [gcp] extra runs it: Beam finds no apitools.
WITHOUT_APITOOLS = ("import runpy, sys\n"
                    "sys.modules['apitools'] = None\n"
                    "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n")

# What TensorFlow 2.21 printed while loading on a machine with no CUDA driver (TF_CPP_MIN_LOG_LEVEL=2).
NO_GPU_START_UP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795847647.361659    7953 port.cc:153] oneDNN custom operations are on. You may see slightly \
different numerical results due to floating-point round-off errors from different computation orders. \
To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1795847647.362469    7953 cudart_stub.cc:31] Could not find cuda drivers on your machine, \
GPU will not be used.
E0000 00:00:1795847649.014661    7953 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: \
Failed call to cuInit: UNKNOWN ERROR (303)
"""
CUINIT_NO_DEVICE = ("E0000 00:00:1795847649.014661    7953 cuda_platform.cc:52] failed call to cuInit: "
                    "CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected\n")
CUINIT_BROKEN_DRIVER = ("E0000 00:00:1795847649.014661    7953 cuda_platform.cc:52] failed call to cuInit: "
                        "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH: system has unsupported display driver / "
                        "cuda driver combination\n")
OTHER_ERROR = "E0000 00:00:1795847649.1    7953 op_kernel.cc:1857] OP_REQUIRES failed at conv_ops.cc:9\n"
PYTHON_OUTPUT = "Traceback (most recent call last):\nImportError: libfoo.so: cannot open shared object file\n"


def _python(*args, env=None, unset=()):
  environment = {k: v for k, v in os.environ.items() if k not in unset}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                        env={**environment, **(env or {})})


def test_list_backbones_and_help_print_nothing_on_stderr_without_the_gcp_extra():
  listed = _python("-c", WITHOUT_APITOOLS, "--list-backbones")
  assert listed.returncode == 0 and listed.stderr == ""
  header = listed.stdout.split("\n", 1)[0]
  assert header.split() == ["name", "native", "size", "min", "size", "preprocessing", "dim"]
  helped = _python("-c", WITHOUT_APITOOLS, "--help")
  assert helped.returncode == 0 and helped.stderr == ""
  assert helped.stdout.startswith("usage: embed-images ")
  # The same without apitools hidden: as installed here.
  for flag in ("--list-backbones", "--help"):
    result = _python("-m", "pipeline", flag)
    assert result.returncode == 0 and result.stderr == "" and "apitools" not in result.stdout


def test_verbose_leaves_beams_warning_on():
  # Also shows that hiding apitools does make Beam warn, so the test above can fail.
  listed = _python("-c", WITHOUT_APITOOLS, "--list-backbones", "--verbose")
  assert listed.returncode == 0
  assert listed.stderr.splitlines() == ["WARNING:root:apitools not found, and bigquery client libraries are not "
                                        "available despite the import not raising an ImportError."]


def test_without_tensorflow_noise_keeps_only_what_is_not_noise():
  assert cli.without_tensorflow_noise(NO_GPU_START_UP) == ""
  assert cli.without_tensorflow_noise(NO_GPU_START_UP + OTHER_ERROR + PYTHON_OUTPUT) == OTHER_ERROR + PYTHON_OUTPUT
  # A driver and no device: no GPU either. A driver that fails a GPU: kept, it is why the run is on CPU.
  assert cli.without_tensorflow_noise(CUINIT_NO_DEVICE) == ""
  assert cli.without_tensorflow_noise(CUINIT_BROKEN_DRIVER) == CUINIT_BROKEN_DRIVER
  # A message's continuation line is not a log line of its own: kept.
  assert cli.without_tensorflow_noise("To enable the following instructions: AVX2\n") == (
      "To enable the following instructions: AVX2\n")


def test_noise_held_back_is_caught_at_the_file_descriptor_and_the_rest_replayed():
  # A fresh process: pytest's own capture would stand in for sys.stderr here.
  code = ("import os, sys\n"
          "from pipeline import cli\n"
          "with cli.tensorflow_noise_held_back():\n"
          "  os.write(2, sys.argv[1].encode())  # as C++ writes: not through sys.stderr\n"
          "  print('from python', file=sys.stderr)\n"
          "print('after', file=sys.stderr)\n")
  result = _python("-c", code, NO_GPU_START_UP + OTHER_ERROR)
  assert (result.returncode, result.stdout) == (0, "")
  assert result.stderr == OTHER_ERROR + "from python\nafter\n"


# `python -m pipeline ARGS`, saying last on stdout whether TensorFlow was ever imported.
REPORTS_TENSORFLOW = ("import atexit, runpy, sys\n"
                      "atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules))\n"
                      "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n")


def _run(out, *extra):
  # As from a shell: importing pipeline here set TF_CPP_MIN_LOG_LEVEL in this process's environment.
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run([sys.executable, "-c", REPORTS_TENSORFLOW, "--input", f"{SAMPLES}/*.jpg", "--output",
                         str(out), "--backbones", "mobilenet_v2", "--weights", "random", "--image-size", "64", *extra],
                        capture_output=True, text=True, cwd=REPO, timeout=300, env=env)


def _own_lines_only(result) -> bool:
  return [line for line in result.stderr.splitlines() if not line.startswith("embed-images: ")] == []


def test_a_run_prints_only_its_own_lines_unless_verbose_and_imports_tensorflow_only_to_embed(tmp_path):
  quiet = _run(tmp_path / "quiet")
  assert quiet.returncode == 0, quiet.stderr
  assert _own_lines_only(quiet), quiet.stderr
  # TensorFlow was imported where the first batch needed the model, its start-up lines held back.
  assert quiet.stdout.splitlines()[-1] == "tensorflow imported: True"
  # An unchanged refresh builds no model: it never imports TensorFlow (4-6 s of every nightly run).
  refresh = _run(tmp_path / "refresh", "--previous", str(tmp_path / "quiet"))
  assert refresh.returncode == 0, refresh.stderr
  assert _own_lines_only(refresh), refresh.stderr
  assert ", 0 embedded, 7 carried over, 0 failed" in refresh.stderr.splitlines()[-1], refresh.stderr
  assert refresh.stdout.splitlines()[-1] == "tensorflow imported: False"
  loud = _run(tmp_path / "loud", "--verbose")  # taken out before Beam or the job's parser see it
  assert loud.returncode == 0, loud.stderr
  assert loud.stderr.splitlines()[-1].startswith("embed-images: ok: ")
  # TensorFlow says something on start-up on every machine (at least absl's preamble): shown.
  assert [line for line in loud.stderr.splitlines() if not line.startswith("embed-images: ")] != []


def test_a_run_never_imports_bigquerys_client_and_scikit_learn_imports_after_tensorflow(tmp_path):
  # Beam imports google-cloud-bigquery's client with the [gcp] extra (~0.3 s); the command line never uses it.
  pytest.importorskip("google.cloud.bigquery")
  code = ("import atexit, runpy, sys\n"
          "atexit.register(lambda: print('bigquery imported:', sys.modules.get('google.cloud.bigquery') is not None))\n"
          "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n")
  result = _python("-c", code, "--input", f"{SAMPLES}/*.jpg", "--output", str(tmp_path / "out"), "--backbones",
                   "mobilenet_v2", "--weights", "random", "--image-size", "32")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[-1] == "bigquery imported: False"
  assert result.stderr.splitlines()[-1].startswith("embed-images: ok: 7 matched, 7 embedded")


@pytest.mark.parametrize("module,submodule", [("sklearn", "sklearn.neighbors"), ("IPython", "IPython.display"),
                                              ("scipy", "scipy.sparse")])
def test_the_command_lines_tensorflow_import_leaves_optional_modules_out_and_importable_after(module, submodule):
  # Keras imports them with TensorFlow where they are installed: its scikit-learn wrappers (~0.8 s
  # here) and its saving.file_editor's notebook display (~0.13 s); TensorFlow's legacy Keras engine
  # imports SciPy's sparse matrices (~0.1 s).
  pytest.importorskip(module)
  code = ("import sys\n"
          "from pipeline import cli\n"
          "from transforms import tensorflow_import\n"
          "tensorflow_import.on_first_import(lambda: cli._first_tensorflow_import(False))\n"
          "tensorflow_import.load_tensorflow()\n"
          f"print('keras' in sys.modules, {module!r} in sys.modules)\n"
          f"import {submodule}\n"
          f"print({submodule}.__name__)\n")
  result = _python("-c", code)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["True", "False", submodule]


@pytest.mark.parametrize("chosen,want", [(None, "system"), ("mimalloc", "mimalloc")])
def test_the_command_line_gives_arrow_the_system_allocator_unless_the_user_chose_one(chosen, want):
  # Arrow's default mimalloc held ~2x what Arrow had allocated (benchmarks/README.md, refresh memory).
  code = ("import atexit, runpy\n"
          "atexit.register(lambda: print('arrow pool:', __import__('pyarrow').default_memory_pool().backend_name))\n"
          "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n")
  result = _python("-c", code, "--list-backbones", env={"ARROW_DEFAULT_MEMORY_POOL": chosen} if chosen else None,
                   unset=("ARROW_DEFAULT_MEMORY_POOL",))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines()[-1] == f"arrow pool: {want}"
