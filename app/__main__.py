"""Entry point: ``python -m app serve --embedded`` and the management commands."""

from app.cli import main

raise SystemExit(main())
