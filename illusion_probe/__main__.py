"""``python -m illusion_probe ...`` runs the command line (also under ``torchrun``)."""

import sys

from illusion_probe.cli import main

sys.exit(main())
