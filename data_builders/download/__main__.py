"""``python -m data_builders.download``: see `data_builders.download.cli`."""

import sys

from data_builders.download.cli import main

sys.exit(main())
