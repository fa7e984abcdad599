# Importing llmcore first sets the OpenMP spin limit before any stage module imports torch (llmcore/threads.py).
import llmcore  # noqa: F401
