"""``python -m trainer.report``: the report's command keeps its name; the code is trainer/observe/report.py."""

from __future__ import annotations

import sys

from trainer.observe.report import main

if __name__ == "__main__":
    sys.exit(main())
