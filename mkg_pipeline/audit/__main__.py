"""``python -m mkg_pipeline.audit``."""

import sys

from mkg_pipeline.audit.cli import main

if __name__ == "__main__":
    sys.exit(main())
