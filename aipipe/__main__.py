"""Allow `python -m aipipe`."""
from .cli import main

raise SystemExit(main())
