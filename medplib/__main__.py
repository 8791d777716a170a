"""`python -m medplib ...` is the `medplib` command.

The command line lives in `workflows.cli` (this package never imports the jobs), so it is found the way the
shell finds it: through the console script this distribution registers.
"""

import sys
from importlib.metadata import entry_points

if __name__ == "__main__":
    (script,) = entry_points(group="console_scripts", name="medplib")
    sys.exit(script.load()())
