"""``python -m qgrad ...``: the same command line as the ``qgrad`` script."""

from qgrad.cli import entry

raise SystemExit(entry())
