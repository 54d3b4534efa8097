"""`python -m zonewatch.lab`: see zonewatch.lab.cli."""

import sys

from zonewatch.lab.cli import main

sys.exit(main())
