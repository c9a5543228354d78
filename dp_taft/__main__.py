"""``python -m dp_taft``: the ``dp-taft`` command line (:mod:`dp_taft.cli`)."""

from .cli import main

raise SystemExit(main())
