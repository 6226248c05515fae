"""`python -m imagetool.cli ...`: the lab's reset command runs it this way."""

from imagetool.cli import main

main()
