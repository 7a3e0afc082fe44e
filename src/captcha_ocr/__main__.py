"""Run the command line with ``python -m captcha_ocr`` (also under torchrun)."""

import sys

from captcha_ocr.cli import main

sys.exit(main())
