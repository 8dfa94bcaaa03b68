"""The one rich Console rule for every command's tables."""

import sys

from rich.console import Console

PIPED_WIDTH = 200


def console() -> Console:
    """A console for stdout; piped output (CI logs, files, `| tee`) gets a wide table instead of rich's
    80-column default, which elides values."""
    return Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
