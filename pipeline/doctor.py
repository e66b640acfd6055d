"""``python -m pipeline.doctor``: can onnxruntime run on CUDA here (:mod:`pipeline.models.doctor`)."""

from pipeline.errors import run_cli
from pipeline.models.doctor import main

if __name__ == "__main__":
    run_cli(main)
