"""`python -m flowerdist ...`, also what `accelerate launch -m flowerdist train ...` runs."""

from flowerdist.cli import run

run()
