"""Flex Template entry point: the launcher runs this file with the template's parameters as --name=value flags."""

from pipeline.cli import main

if __name__ == "__main__":
  main()
