"""``python -m pipeline.fit``."""

from pipeline.errors import run_cli
from pipeline.fit.run import main

run_cli(main)
