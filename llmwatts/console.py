"""The one rich Console rule for every command's tables."""

import sys

from rich.console import Console

PIPED_WIDTH = 200


def console() -> Console:
    """A console for stdout; piped output (CI logs, files, `| tee`) gets a wide table instead of rich's
    80-column default, which elides values."""
    return Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)


def simulated_power_notice(targets: list[str]) -> str:
    """The one line a client command prints when its servers' GPUs are simulated (``power_source``)."""
    return (f"note: {', '.join(targets)} runs a SIMULATED GPU: its watts, joules and power caps are a model "
            "(docs/power-caps.md), not measurements; on a shared CPU box they follow the model times the host's "
            "wall time, so they are noisy (docs/energy.md)")
