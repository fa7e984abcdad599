"""Loaded by Python at start-up when this folder is on PYTHONPATH: traces a pipeline stage's file reads and writes
(tests/stage_io.py) when STAGE_IO_LOG is set; any other process, or any process without it, is left alone."""

import os

if os.environ.get("STAGE_IO_LOG"):
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_stage_io_tracer", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stage_io.py")
    )
    _tracer = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_tracer)
    _tracer.install()
