"""`python -m flowerdist ...`, also what `accelerate launch -m flowerdist train ...` runs."""

import sys

from flowerdist.cli import main

sys.exit(main())
