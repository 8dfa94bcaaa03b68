"""``llmwatts load`` / ``sweep`` as a new user meets them (issue 16 item 9): a used run id stops before
anything is sent; one vocabulary with ``cap``, ``clocks`` and ``serve``."""

import sqlite_utils

from tests.loadgen.conftest import LLMWATTS, offline_env  # noqa: F401 (LLMWATTS: the command line the helpers run)
from test_load import load


def test_a_used_run_id_stops_before_sending_anything(server, tmp_path):
    """Guards: `load --run-id X` with X already used printed three lines, sent its request anyway and
    recorded it under the old run."""
    target, server_db = server
    first = load(tmp_path, "--target", target, "--dataset", "mini", "--requests", "1", "--max-new-tokens", "4",
                 "--run-id", "used-once", "--client-db", str(tmp_path / "a.db"), "--quiet")
    assert first.returncode == 0, first.stderr
    again = load(tmp_path, "--target", target, "--dataset", "mini", "--requests", "2", "--max-new-tokens", "4",
                 "--run-id", "used-once", "--client-db", str(tmp_path / "b.db"), "--quiet")
    assert again.returncode == 2
    assert "run id 'used-once' was already used on this server: nothing was sent" in again.stderr.splitlines()[-1]
    assert "Traceback" not in again.stderr
    rows = sqlite_utils.Database(server_db).query("select count(*) n from requests where run_id = 'used-once'")
    assert next(rows)["n"] == 1  # the first run's one request, nothing more
    client = sqlite_utils.Database(tmp_path / "b.db")
    assert not client["client_requests"].exists() or client["client_requests"].count == 0
    ended = next(sqlite_utils.Database(server_db).query("select end_ns from runs where run_id = 'used-once'"))
    assert ended["end_ns"]  # the first run's window stays as its own EndRun left it


def parser_of(command: str):
    from llmwatts.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices[command]


def options(parser) -> dict:
    out = {}
    stack = [parser]
    while stack:
        p = stack.pop()
        for a in p._actions:
            if a.option_strings:
                out[a.option_strings[0]] = a
            if getattr(a, "choices", None) and isinstance(a.choices, dict):
                stack.extend(a.choices.values())
    return out


def test_one_vocabulary_across_commands():
    """Guards: `--token-file` meant the control token in `cap` and the inference token in `load`/`sweep`;
    `cap --gpus` took space-separated values where `sweep --gpus` repeated; `sweep --target` mentioned a
    `--worker` it lacks."""
    cap, clocks, load_, sweep, serve = (options(parser_of(c)) for c in ("cap", "clocks", "load", "sweep", "serve"))
    for opts in (cap, clocks, load_, sweep, serve):
        assert "--token-file" not in opts
    for opts in (cap, clocks, sweep, serve):
        assert "control token" in opts["--control-token-file"].help
    for opts in (load_, sweep, serve):
        assert "inference token" in opts["--inference-token-file"].help
    gpus = [cap["--gpus"], clocks["--gpus"], sweep["--gpus"]]
    assert {(g.nargs, type(g).__name__, g.metavar) for g in gpus} == \
        {(None, "_StoreAction", "SEL[,SEL...]")}
    assert "--worker" not in sweep["--target"].help and "--worker" in load_["--target"].help


def test_every_command_parses_targets_and_gpus_the_same_way():
    """One target parser and one GPU selector for every command."""
    import pytest

    from llmwatts.client import gpu_selector, parse_target
    from llmwatts.errors import InvalidArgument

    assert parse_target("grpc://gpu-host:50051/") == "gpu-host:50051"
    assert parse_target("[::1]:7") == "[::1]:7"
    for bad in ("gpu-host", "gpu-host:0", "gpu-host:99999", "h:５０"):
        with pytest.raises(InvalidArgument, match="HOST:PORT"):
            parse_target(bad)
    assert list(gpu_selector("0, 1:2,GPU-ab").gpus) == ["0", "1:2", "GPU-ab"]
    assert list(gpu_selector(["0,1", "2"]).gpus) == ["0", "1", "2"] and not gpu_selector(None).gpus
