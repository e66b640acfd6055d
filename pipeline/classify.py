"""``python -m pipeline.classify``: the classify command (:mod:`pipeline.serve.classify`)."""

from pipeline.errors import run_cli
from pipeline.serve.classify import main

if __name__ == "__main__":
    run_cli(main)
