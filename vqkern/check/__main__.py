"""python -m vqkern.check: see vqkern.check.cli."""
from .cli import main

raise SystemExit(main())
