# One image for embed-images on Dataflow: the SDK worker container of the GPU (and CPU) workers,
# and the Flex Template launcher (dataflow/metadata.json). Beam and Python must be those that
# launch the job: apache-beam 2.77.0 on Python 3.11.
#
#   docker build -t us-central1-docker.pkg.dev/PROJECT/REPO/embed-images:0.1.0 .
#   (or: gcloud builds submit --tag us-central1-docker.pkg.dev/PROJECT/REPO/embed-images:0.1.0 .)
#
# then launch with --sdk_container_image=<that tag> (and no --setup_file: the package is here).
#
# CPU workers (--engine openvino, or auto): no CUDA wheels, OpenVINO instead (the [openvino] extra):
#
#   docker build --build-arg TENSORFLOW=tensorflow --build-arg EXTRAS="[hub,openvino]" \
#     -t us-central1-docker.pkg.dev/PROJECT/REPO/embed-images-cpu:0.1.0 .
ARG BEAM_VERSION=2.77.0
ARG LAUNCHER_BASE=gcr.io/dataflow-templates-base/python311-template-launcher-base:latest

FROM ${LAUNCHER_BASE} AS launcher

FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

# The Flex Template launcher binary: lets this same image launch the job it runs.
COPY --from=launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher

WORKDIR /template
# The versions the tests run with (TensorFlow, Keras, NumPy, pyarrow, ...), so workers compute what
# the tests checked. Its apache-beam pin must equal BEAM_VERSION.
COPY constraints.txt ./
# GPU TensorFlow: CUDA and cuDNN come as pip wheels (nvidia-*-cu12), so no CUDA base image;
# the driver is installed on the VM by Dataflow (install-nvidia-driver in the accelerator hint).
# TENSORFLOW=tensorflow for the CPU image: the same TensorFlow without the ~3 GB of CUDA wheels.
ARG TENSORFLOW="tensorflow[and-cuda]"
RUN pip install --no-cache-dir -c constraints.txt "${TENSORFLOW}" keras

COPY setup.py ./
COPY pipeline ./pipeline
COPY transforms ./transforms
COPY dataflow/flex_main.py ./
# Not editable: workers import the package from site-packages, whatever their working directory.
# TensorFlow and Beam are already satisfied, so pip leaves them as they are.
# The last test fails the build if constraints.txt's apache-beam pin made pip replace the SDK's Beam.
# The hub extra (keras-hub, tensorflow-text) too: hub:PRESET backbones. HUB_PRESETS (comma-separated
# KerasHub preset names) are downloaded into KerasHub's cache here, so workers need no internet for them.
ARG BEAM_VERSION
ARG HUB_PRESETS=""
ARG EXTRAS="[hub]"
ENV KAGGLEHUB_CACHE=/opt/kagglehub
RUN pip install --no-cache-dir -c constraints.txt ".${EXTRAS}" \
    && python -c "import pipeline.main, transforms.embed, tensorflow, apache_beam; print(apache_beam.__version__, tensorflow.__version__)" \
    && case "${EXTRAS}" in *openvino*) python -c "import openvino; print(openvino.get_version())";; esac \
    && test "$(python -c 'import apache_beam; print(apache_beam.__version__)')" = "${BEAM_VERSION}" \
    && case "${EXTRAS}" in *hub*) python -c "import sys, keras_hub; [(keras_hub.models.Backbone.from_preset(p), keras_hub.layers.ImageConverter.from_preset(p)) for p in sys.argv[1].split(',') if p]" "${HUB_PRESETS}";; esac

ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/flex_main.py
# Everything is installed: the launcher must not pip-install anything at launch.
ENV PIP_NO_DEPS=True

# The Beam SDK harness: what Dataflow runs in every worker container.
ENTRYPOINT ["/opt/apache/beam/boot"]
