"""Registration of the subcommands that live beside their own modules.

Each registrar adds one subparser to the ``captcha-ocr`` command and sets its
handler; the heavy imports happen inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

REGISTRARS: list = []
