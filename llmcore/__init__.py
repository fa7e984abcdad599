"""llmcore: the model library behind the pipeline's stages (see README)."""

__version__ = "0.1.0"
