"""`python -m imagetool ...`: the same command line as `imagetool`."""

from imagetool.cli import main

main()
