"""`python -m pipeline`: the same as the `embed-images` console script."""

from pipeline.cli import main

main()
