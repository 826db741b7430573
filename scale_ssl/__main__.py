"""``python -m scale_ssl ...`` (also what ``torchrun -m scale_ssl`` runs on every rank)."""

import sys

from scale_ssl.cli.main import main

sys.exit(main())
