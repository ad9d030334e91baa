"""`python -m khmon` runs the khmon command line."""

from .entry import main

main()
