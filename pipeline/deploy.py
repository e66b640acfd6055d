"""``python -m pipeline.deploy``: the deploy command (:mod:`pipeline.serve.deploy`)."""

from pipeline.errors import run_cli
from pipeline.serve.deploy import main

if __name__ == "__main__":
    run_cli(main)
