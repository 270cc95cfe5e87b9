"""Flex Template entry point: the launcher runs this file with the template's parameters as --name=value flags."""

from pipeline.main import main

if __name__ == "__main__":
  main()
