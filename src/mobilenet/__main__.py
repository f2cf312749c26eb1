"""``python -m mobilenet ...`` (also what ``torchrun -m mobilenet train ...`` runs)."""

from mobilenet.cli import main

raise SystemExit(main())
