"""Extract: discover the images, decode each once into every model's crop, embed them (here or on Ray), store them."""

from pipeline.extract.run import ExtractOptions, run_extract

__all__ = ["ExtractOptions", "run_extract"]
