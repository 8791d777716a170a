"""`python -m workflows.cli ...`: what `medplib submit` runs inside a Ray Job."""

import sys

from workflows.cli import main

sys.exit(main())
