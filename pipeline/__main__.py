"""``python -m pipeline STAGE ...``: the ``transfer`` command without the installed script."""

from pipeline.cli import main

main()
