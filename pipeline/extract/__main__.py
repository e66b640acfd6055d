"""``python -m pipeline.extract DATA``."""

from pipeline.errors import run_cli
from pipeline.extract.run import main

run_cli(main)
