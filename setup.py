"""Package and console script; also what Dataflow workers install with --setup_file."""

import setuptools

setuptools.setup(
    name="embed-images",
    version="0.1.0",
    description="Batch image embeddings with frozen keras.applications backbones on Apache Beam",
    packages=["pipeline", "transforms"],
    py_modules=["embed_images"],
    package_data={"pipeline": ["report.html"]},  # the report page's template
    python_requires=">=3.10",
    install_requires=[
        # Upper bounds: the next minor after the versions tested (constraints.txt pins those).
        "apache-beam>=2.60,<2.78",
        "tensorflow>=2.16,<2.22",
        "keras>=3.0,<3.16",
        "pyarrow>=14,<25.1",
        "pillow>=10,<12.4",
        "tqdm>=4.60,<4.71",
        "numpy<2.5",
    ],
    extras_require={
        "gcp": ["apache-beam[gcp]>=2.60,<2.78"],
        # IPython: the command line keeps it out of TensorFlow's import (Keras imports it where
        # installed); installed for the tests, so that test runs.
        "test": ["pytest>=7", "gcp-storage-emulator", "playwright>=1.40,<1.66", "ipython>=8,<10"],
        # `embed-images report`: projection, neighbour search and probes.
        "report": ["scikit-learn>=1.4,<1.10"],
        # KerasHub presets (hub:PRESET). On Linux it pulls tensorflow-text, which needs the full
        # tensorflow wheel: install_requires has it already.
        "hub": ["keras-hub>=0.32,<0.33"],
        # --engine openvino|auto on CPU workers (transforms/openvino_engine.py)
        "openvino": ["openvino>=2025.4,<2026.5"],
    },
    entry_points={"console_scripts": ["embed-images=pipeline.cli:main"]},
)
