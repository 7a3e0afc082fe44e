"""Run the command line with ``python -m captcha_ocr`` (also under torchrun)."""

import logging
import os
import sys

from captcha_ocr.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # NOTE: under torchrun with Gloo (PyTorch 2.13), a worker sometimes aborted
    # during interpreter teardown, after training had finished and the process
    # group was destroyed ("terminate called without an active exception").
    # Leaving without that teardown keeps the exit code; output is flushed first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
