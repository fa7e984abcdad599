"""llmcore: the model library behind the pipeline's stages (see README)."""

from llmcore.threads import limit_spinning

# Before anything imports torch (libgomp reads it once, when it loads): idle OpenMP workers sleep soon instead of
# spinning for milliseconds, which on a CPU shared with other work costs 10x (llmcore/threads.py).
limit_spinning()

__version__ = "0.1.0"
