"""Image embeddings at batch scale: a Beam pipeline over frozen keras.applications backbones."""
