"""``python -m fcmae`` = the ``fcmae`` console script."""

import sys

from fcmae.cli import main

sys.exit(main())
