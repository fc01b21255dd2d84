"""``python -m fastlsm.bench [options]``, the same as ``fastlsm bench [options]``."""

import sys

from fastlsm.bench.command import main

sys.exit(main())
