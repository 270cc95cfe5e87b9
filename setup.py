"""Package and console script; also what Dataflow workers install with --setup_file."""

import setuptools

setuptools.setup(
    name="embed-images",
    version="0.1.0",
    description="Batch image embeddings with frozen keras.applications backbones on Apache Beam",
    packages=["pipeline", "transforms"],
    python_requires=">=3.10",
    install_requires=[
        "apache-beam>=2.60",
        "tensorflow>=2.16",
        "keras>=3.0",
        "pyarrow>=14",
        "pillow>=10",
        "tqdm>=4.60",
        "numpy",
    ],
    extras_require={
        "gcp": ["apache-beam[gcp]>=2.60"],
        "test": ["pytest>=7", "gcp-storage-emulator"],
    },
    entry_points={"console_scripts": ["embed-images=pipeline.cli:main"]},
)
