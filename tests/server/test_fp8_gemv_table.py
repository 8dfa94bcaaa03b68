"""The weight-only GEMV's tuning table (``$LLMWATTS_FP8_GEMV_TABLE``, issue 20): what
``bench/fp8_gemv.py --write-table`` writes (the sweep's fastest configuration per product on one card)
``pick_config`` uses for exactly those products, and a bad table is refused in one line before any
kernel could launch with it. No GPU needed: the table is plain data; the kernel's maths at the
configurations a table may hold (swapped included) is checked in ``test_fp8_gemv.py``."""

import json
import os
import subprocess
import sys

import pytest

from llmwatts.errors import InvalidArgument

fp8_gemv = pytest.importorskip("llmwatts.server.engine.fp8_gemv",
                               reason="Triton is not installed: pip install -e '.[test]'")

SWAPPED = {"m": 64, "n": 12288, "k": 4096, "block_m": 64, "block_n": 128, "block_k": 128, "split_k": 1,
           "num_warps": 4, "num_stages": 4, "swap": True}


@pytest.fixture
def fresh(monkeypatch):
    """A table path is read once per process: clear that cache around each test."""
    fp8_gemv._table_at.cache_clear()
    yield monkeypatch
    fp8_gemv._table_at.cache_clear()


def write(tmp_path, doc) -> str:
    path = tmp_path / "table.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_a_table_entry_is_used_for_its_product_only(tmp_path, fresh):
    """Guards against a table that is read but ignored, or applied to other shapes: the entry's
    (M, N, K) gets its configuration; another M, N or K keeps the built-in rule."""
    built_in = {key: fp8_gemv.pick_config(*key) for key in [(64, 12288, 4096), (32, 12288, 4096),
                                                            (64, 4096, 4096)]}
    assert built_in[(64, 12288, 4096)].swap is False
    fresh.setenv(fp8_gemv.TABLE_ENV, write(tmp_path, {"device": "test", "configs": [{**SWAPPED, "us": 21.5}]}))
    chosen = fp8_gemv.pick_config(64, 12288, 4096)
    assert chosen == fp8_gemv.GemvConfig(64, 128, 128, 1, 4, 4, swap=True)
    assert chosen.label() == "m64n128k128s1w4p4x"
    for key in [(32, 12288, 4096), (64, 4096, 4096)]:
        assert fp8_gemv.pick_config(*key) == built_in[key]


def test_the_benchs_table_round_trips(tmp_path, fresh):
    """Guards against the bench and the loader disagreeing on the format: ``fastest_configs`` over sweep
    rows keeps the fastest per product, and ``load_table`` reads back exactly those configurations."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    try:
        import fp8_gemv as bench
    finally:
        sys.path.pop(0)
    configs = [fp8_gemv.GemvConfig(64, 32, 256, 1, 8, 4), fp8_gemv.GemvConfig(64, 128, 128, 2, 4, 4, True),
               fp8_gemv.GemvConfig(16, 64, 256, 1, 4, 3, True)]
    import dataclasses
    rows = [{"shape": "qkv", "m": 64, "n": 12288, "k": 4096, "us": us, "fields": dataclasses.asdict(c)}
            for c, us in zip(configs, (50.6, 21.0, 30.2))]
    rows += [{"shape": "o", "m": 64, "n": 4096, "k": 4096, "error": "OutOfResources", "fields": {}},
             {"shape": "o", "m": 64, "n": 4096, "k": 4096, "us": 9.9, "fields": dataclasses.asdict(configs[2])}]
    table = bench.fastest_configs(rows, "test card")
    path = write(tmp_path, table)
    assert fp8_gemv.load_table(path) == {(64, 12288, 4096): configs[1], (64, 4096, 4096): configs[2]}


@pytest.mark.parametrize("doc, says", [
    ("{not json", "not JSON"),
    ({"configs": {}}, "want {"),
    ([], "want {"),
    ({"configs": [SWAPPED] * (4096 + 1)}, "at most 4096"),
    ({"configs": ["x"]}, "entry 0: not an object"),
    ({"configs": [{**SWAPPED, "m": 0}]}, "m, n and k must be whole numbers"),
    ({"configs": [{**SWAPPED, "k": 4096.0}]}, "m, n and k must be whole numbers"),
    ({"configs": [{**SWAPPED, "n": 1 << 21}]}, "m, n and k must be whole numbers"),
    ({"configs": [{**SWAPPED, "block_n": 48}]}, "block_n=48"),
    ({"configs": [{**SWAPPED, "block_k": True}]}, "block_k=True"),
    ({"configs": [{**SWAPPED, "num_warps": 16}]}, "num_warps=16"),
    ({"configs": [{**SWAPPED, "num_stages": 0}]}, "num_stages=0"),
    ({"configs": [{**SWAPPED, "split_k": 65}]}, "split_k=65"),
    ({"configs": [{**SWAPPED, "swap": "yes"}]}, "swap=yes"),
    ({"configs": [{**SWAPPED, "block_m": 1}]}, "swap needs block_m >= 16"),
    ({"configs": [{**SWAPPED, "blockn": 64}]}, "unknown field 'blockn'"),
    ({"configs": [{k: v for k, v in SWAPPED.items() if k != "block_n"}]}, "block_n=None"),
])
def test_a_bad_table_is_refused_in_one_line(tmp_path, fresh, doc, says):
    """Guards against a malformed or out-of-range table reaching a kernel launch (a block of 48 or
    16 warps fails deep in Triton, a huge split allocates huge partial sums): each is refused with
    InvalidArgument naming the env var, the entry and the field, in one line."""
    fresh.setenv(fp8_gemv.TABLE_ENV, write(tmp_path, doc))
    with pytest.raises(InvalidArgument) as e:
        fp8_gemv.pick_config(64, 12288, 4096)
    message = str(e.value)
    assert says in message and fp8_gemv.TABLE_ENV in message and "\n" not in message


def test_a_missing_or_oversized_table_is_refused(tmp_path, fresh):
    """Guards against a typo'd path silently running the built-in configs, and against reading a huge
    file: both refused in one line."""
    fresh.setenv(fp8_gemv.TABLE_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(InvalidArgument, match="cannot read it.*--write-table"):
        fp8_gemv.pick_config(64, 12288, 4096)
    big = tmp_path / "big.json"
    big.write_text(" " * (fp8_gemv.TABLE_MAX_BYTES + 1))
    fresh.setenv(fp8_gemv.TABLE_ENV, str(big))
    with pytest.raises(InvalidArgument, match="over 1 MiB"):
        fp8_gemv.pick_config(64, 12288, 4096)


def test_the_bench_writes_a_loadable_table_on_cpu(tmp_path):
    """Guards against ``--write-table`` breaking in the bench's CPU path (``--quick``): it writes a table
    ``load_table`` accepts, one entry per swept product."""
    bench = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "fp8_gemv.py")
    out = tmp_path / "t.json"
    done = subprocess.run([sys.executable, bench, "--quick", "--rows", "1,16", "--sweep-rows", "16",
                           "--compiled-rows", "", "--write-table", str(out)], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = fp8_gemv.load_table(out)
    assert len(table) == 4 and {key[0] for key in table} == {16}
