"""``python -m mavis_lc.cli``."""

from mavis_lc.cli import app

app()
