"""`python -m kerasrot` is the `kerasrot` command."""

from kerasrot.runner.cli import main

main()
