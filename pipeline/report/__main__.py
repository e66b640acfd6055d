"""``python -m pipeline.report STORE_OR_OUT_DIR``: make report.html again, without fitting."""

from pipeline.errors import run_cli
from pipeline.report.build import main

run_cli(main)
