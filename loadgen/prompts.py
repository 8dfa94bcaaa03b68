"""Prompt sources: Alpaca, GSM8K, any JSONL field, and the embedded mini set.

A ``PromptSet`` is the sampled list of prompts a run replays, in order: request ``k`` of a run carries
prompts ``k*B .. k*B+B-1`` (wrapping), so a run is repeatable from (dataset, seed, N, B).

Files are looked up in ``llmwatts.paths.data_dirs(--data-dir)``; a missing Alpaca/GSM8K file is fetched
into the cache when online, else ``NotFound`` names the file to place and the folders searched.
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llmwatts import paths
from llmwatts.errors import InvalidArgument, NotFound

DATASETS = ("alpaca", "gsm8k", "jsonl", "mini")
GSM8K_SPLITS = ("test", "train")
DEFAULT_NUM_PROMPTS = 4096  # the paper's sample size
DEFAULT_SEED = 0
MINI_DATASET_NAME = "mini (embedded, not Alpaca/GSM8K)"
# Set (to anything) to never touch the network for prompt files; HF_HUB_OFFLINE is honoured too.
OFFLINE_ENV = "LLMWATTS_OFFLINE"
FETCH_TIMEOUT_S = 10.0

ALPACA_FILES = ("alpaca_5k.jsonl", "alpaca_data.json")
ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"

_ALPACA_HEAD = "Below is an instruction that describes a task"
_ALPACA_WITH_INPUT = ", paired with an input that provides further context"
_ALPACA_TAIL = ". Write a response that appropriately completes the request.\n\n"


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca training template; the input section appears only when ``input_text`` is non-empty."""
    if input_text:
        return (
            f"{_ALPACA_HEAD}{_ALPACA_WITH_INPUT}{_ALPACA_TAIL}"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
        )
    return f"{_ALPACA_HEAD}{_ALPACA_TAIL}### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class PromptSet:
    """The prompts a run replays. ``name`` is the dataset label written into every client record."""

    name: str
    prompts: tuple[str, ...]
    source: str  # file path, or "embedded"

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, seq: int, batch_size: int) -> list[str]:
        """Prompts of request number ``seq`` (from 0) at ``batch_size`` prompts per request."""
        n = len(self.prompts)
        start = seq * batch_size
        return [self.prompts[(start + i) % n] for i in range(batch_size)]


def sample(records: list[str], num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` records drawn with ``random.Random(seed)``: without replacement when there are
    enough records, else with replacement. Deterministic for a given (records, num_prompts, seed)."""
    if num_prompts <= 0:
        raise InvalidArgument(f"--num-prompts must be positive, got {num_prompts}")
    if not records:
        raise InvalidArgument("the prompt source holds no prompts")
    rng = random.Random(seed)
    if num_prompts <= len(records):
        return [records[i] for i in rng.sample(range(len(records)), num_prompts)]
    return rng.choices(records, k=num_prompts)


def dataset_label(dataset: str, *, split: str = "test", jsonl_path: str | None = None, field: str | None = None) -> str:
    """The dataset name recorded for a run (client DB ``dataset`` column, run labels)."""
    if dataset == "mini":
        return MINI_DATASET_NAME
    if dataset == "gsm8k":
        return "gsm8k" if split == "test" else f"gsm8k-{split}"
    if dataset == "jsonl":
        return f"jsonl:{Path(jsonl_path or '').name}:{field}"
    return dataset


def load_prompts(
    dataset: str,
    *,
    num_prompts: int = DEFAULT_NUM_PROMPTS,
    seed: int = DEFAULT_SEED,
    data_dir: str | os.PathLike | None = None,
    extra_dirs: list[Path] | None = None,
    split: str = "test",
    jsonl_path: str | os.PathLike | None = None,
    field: str | None = None,
    fetch: bool | None = None,
) -> PromptSet:
    """Load, render and sample a dataset's prompts.

    ``fetch`` (default: unless ``LLMWATTS_OFFLINE``/``HF_HUB_OFFLINE`` is set) allows downloading a
    missing Alpaca/GSM8K file into the cache. ``extra_dirs`` are searched before ``data_dirs(data_dir)``
    (a distributed worker's own ``--data-dir``).
    """
    if dataset not in DATASETS:
        raise InvalidArgument(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if fetch is None:
        fetch = not (os.environ.get(OFFLINE_ENV) or os.environ.get("HF_HUB_OFFLINE"))
    dirs = [*(extra_dirs or []), *paths.data_dirs(data_dir)]
    label = dataset_label(dataset, split=split, jsonl_path=str(jsonl_path) if jsonl_path else None, field=field)

    if dataset == "mini":
        records = _mini_records()
        source = "embedded"
    elif dataset == "alpaca":
        path = _find(dirs, ALPACA_FILES) or (_fetch(ALPACA_URL, "alpaca_data.json") if fetch else None)
        if path is None:
            raise _missing(ALPACA_FILES[0], dirs, also=ALPACA_FILES[1])
        records = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in _read_records(path)]
        source = str(path)
    elif dataset == "gsm8k":
        if split not in GSM8K_SPLITS:
            raise InvalidArgument(f"unknown GSM8K split {split!r}: choose test or train")
        name = f"gsm8k_{split}.jsonl"
        path = _find(dirs, (name,)) or (_fetch(GSM8K_URL.format(split=split), name) if fetch else None)
        if path is None:
            raise _missing(name, dirs)
        records = [r["question"] for r in _read_records(path)]
        source = str(path)
    else:  # jsonl
        if not jsonl_path or not field:
            raise InvalidArgument("--dataset jsonl needs --jsonl-path FILE and --field NAME")
        path = Path(jsonl_path)
        if not path.is_absolute() and not path.exists():
            path = _find(dirs, (str(jsonl_path),)) or path
        if not path.exists():
            raise NotFound(f"prompt file {jsonl_path} not found (also searched {', '.join(map(str, dirs))})")
        records = []
        for lineno, record in enumerate(_read_records(path), 1):
            if field not in record:
                raise InvalidArgument(f"{path}:{lineno}: no field {field!r} (fields: {', '.join(record)})")
            records.append(str(record[field]))
        source = str(path)
    return PromptSet(name=label, prompts=tuple(sample(records, num_prompts, seed)), source=source)


def _mini_records() -> list[str]:
    text = resources.files("llmwatts").joinpath("data/mini_prompts.jsonl").read_text(encoding="utf-8")
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "instruction" in record:
            records.append(alpaca_prompt(record["instruction"], record.get("input", "")))
        else:
            records.append(record["question"])
    return records


def _find(dirs: list[Path], names: tuple[str, ...]) -> Path | None:
    for name in names:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    return None


def _missing(name: str, dirs: list[Path], also: str | None = None) -> NotFound:
    alt = f" (or {also})" if also else ""
    return NotFound(
        f"prompt file {name}{alt} not found and could not be downloaded: place it in one of "
        f"{', '.join(map(str, dirs))} (or pass --data-dir DIR / set {paths.DATA_DIR_ENV})"
    )


def _fetch(url: str, name: str) -> Path | None:
    """Download ``url`` into the cache's data folder as ``name``; None when offline or it fails."""
    target = paths.cache_dir() / "data" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError):
        partial.unlink(missing_ok=True)
        return None
    partial.replace(target)
    return target


def _read_records(path: Path) -> list[dict]:
    """JSON Lines, or one JSON array (``alpaca_data.json``)."""
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{path}: not JSON Lines or a JSON array ({e})") from e
