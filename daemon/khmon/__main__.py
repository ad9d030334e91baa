"""`python -m khmon` runs the khmon command line."""

from .cli import main

main()
