"""``python -m explain``: see `explain.cli`."""

from explain.cli import main

raise SystemExit(main())
