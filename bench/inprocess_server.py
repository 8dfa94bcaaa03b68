"""The in-process servers of bench/continuous.py and bench/stream.py: the Alpaca prompt file, one
``ServerConfig`` per mode (fast engine, read-only NVML on a GPU, simulated on CPU, its DB in a scratch
folder), and the model loaded once for all of them."""

import sys
from pathlib import Path

import torch

from llmwatts import paths
from llmwatts.loadgen.prompts import ALPACA_FILES, _find


def alpaca_file(data_dir: str | None) -> Path | None:
    """The Alpaca file in ``data_dir``, else in llmwatts' data folders; None, after one error line on
    stderr, when it is in none of them."""
    dirs = [Path(data_dir)] if data_dir else paths.data_dirs(None)
    path = _find(dirs, ALPACA_FILES)
    if path is None:
        print(f"error: {' or '.join(ALPACA_FILES)} not found in {', '.join(map(str, dirs))}", file=sys.stderr)
    return path


def server_config(args, device: torch.device, db_dir: Path, name: str, **kw):
    """A ``ServerConfig`` of ``args.model`` on ``args.device``, the fast engine, port 0, DB ``name`` in
    ``db_dir``; ``kw``: the mode's own settings."""
    from llmwatts.server.config import ServerConfig

    return ServerConfig(model=args.model, device=args.device, engine="fast", port=0,
                        power_backend="nvml-readonly" if device.type == "cuda" else "simulated",
                        db_path=db_dir / f"{name}.db", cap_state_path=db_dir / f"{name}.caps.json", **kw)


def load_once(config):
    """(loaded model, engine) of ``config``, for every mode's ``Host(config, loaded=, engine=)``."""
    from llmwatts.server.host import Host

    base = Host(config)
    loaded, engine = base.loaded, base.engine
    base.close()
    return loaded, engine
