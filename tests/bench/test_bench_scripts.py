"""The GPU benchmarks' own code paths, on CPU (``--quick``): a benchmark that rots is found here, not on a
paid GPU call. These check that every row is produced and that the engines agree; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, tmp_path, *args: str, timeout_s: int) -> object:
    out = tmp_path / "rows.json"
    # From tmp_path: run from the repo root, ``llmwatts/`` there would shadow the installed package.
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--json", str(out), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_engine_bench_runs_every_engine_and_the_fast_engine_agrees_with_eager(tmp_path):
    results = run_bench("engine.py", tmp_path, timeout_s=600)
    rows = {(r["engine"], r["batch"]): r for r in results["rows"]}
    for engine in ("fast", "server", "fast-bmm", "fast-flex", "eager"):
        for batch in (1, 4):
            assert rows[(engine, batch)]["tok_s"] > 0, (engine, batch, rows.get((engine, batch)))
    # On CPU in fp32 the fast engine (every decode attention) and eager's two paths give the same argmax
    # everywhere.
    assert (results["agreement"] == results["agreement_bmm"]
            == results["agreement_flex"] == results["agreement_eager_incremental"] == 1.0)
    assert [t["hz"] for t in results["telemetry"]] == [0.0, 10.0]


def test_sharding_bench_runs_both_engines_and_the_baseline_on_two_ranks(tmp_path):
    rows = run_bench("sharding.py", tmp_path, timeout_s=900)
    done = {(r["system"], r["shards"], r["batch"]) for r in rows if "error" not in r}
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    for system in ("llmwatts-fast", "llmwatts-eager", "transformers-tp"):
        for shards in (1, 2):
            assert {(system, shards, 1), (system, shards, 2)} <= done, (system, shards, done)
    assert all(r["tok_s"] > 0 and r["j_per_token"] >= 0 for r in rows)


def test_decode_attention_bench_times_every_kernel_and_they_agree(tmp_path):
    results = run_bench("decode_attention.py", tmp_path, timeout_s=300)
    rows = {r["impl"]: r for r in results["rows"]}
    assert set(rows) == {"sdpa", "bmm", "flex", "sdpa-nomask"}
    assert all("error" not in r and r["us"] > 0 for r in rows.values()), rows
    # The engine's three decode attentions give the fp32 reference on a padded batch; the no-mask bound
    # ignores padding by construction, so it has no error figure.
    assert all(rows[i]["max_abs_err"] < 1e-5 for i in ("sdpa", "bmm", "flex")), rows


def test_fp8_gemv_bench_times_every_path_and_shape_and_sums_a_layer(tmp_path):
    """bench/fp8_gemv.py --quick (the reference paths on CPU): every projection x M x path row, the layer
    sums, and the weight-only path exact against the dequantized product where tensor-wise is not; the
    compiled layers (traced by dynamo) and the sweep's loops run without an error."""
    results = run_bench("fp8_gemv.py", tmp_path, timeout_s=300)
    rows = {(r["shape"], r["m"], r["path"]): r for r in results["rows"]}
    assert len(rows) == 4 * 4 * 4 and all("error" not in r and r["us"] > 0 for r in rows.values()), rows
    assert {(s["path"], s["m"]) for s in results["layer"] if s["shapes"] == 4} == {
        (p, m) for p in ("fp16", "tensorwise", "rowwise", "weightonly") for m in (1, 8, 16, 64)}
    for m in (1, 8, 16):  # up to GEMV_MAX_ROWS: weight-only, x as it is
        assert rows[("o", m, "weightonly")]["rel_err"] < 1e-6 < rows[("o", m, "tensorwise")]["rel_err"]
    assert set(results["bf16"]) == {"1", "8", "16", "64"}
    assert max(results["bf16"][m] for m in ("1", "8", "16")) < 2 ** -7  # bf16 rounding of y only
    assert {(r["path"], r["m"]) for r in results["compiled"] if "error" not in r} == {
        (p, m) for p in ("fp16", "tensorwise", "weightonly", "dequant") for m in (1, 16)}, results["compiled"]
    sweep = results["sweep"]
    assert len(sweep) >= 4 * 2 * 6 and all("error" not in r for r in sweep), sweep
    assert sum(r["chosen"] for r in sweep) == 4 * 2  # pick_config's choice marked once per shape and M


def test_profile_step_bench_sorts_every_kernel_of_the_decode_step(tmp_path):
    results = run_bench("profile_step.py", tmp_path, "--variants", "bmm", timeout_s=300)
    rows = {(r["variant"], r["batch"]): r for r in results["rows"]}
    assert set(rows) == {("sdpa", 1), ("sdpa", 4), ("bmm", 1), ("bmm", 4)}
    for r in rows.values():
        assert r["wall_us"] > 0 and r["kernel_us"] > 0
        assert abs(sum(r["kinds"].values()) - r["kernel_us"]) < 1e-6 * r["kernel_us"]
        assert r["kinds"].get("matmul", 0) > 0, r["kinds"]  # the projections were found and sorted
        assert r["kv_bytes_per_step"] > 0
    # SDPA's decode attention is an attention kernel; bmm's is matmuls, so it has no attention time.
    assert rows[("sdpa", 4)]["kinds"].get("attention", 0) > 0
    assert rows[("bmm", 4)]["kinds"].get("attention", 0) < rows[("sdpa", 4)]["kinds"]["attention"]


def test_continuous_bench_runs_static_and_continuous_on_both_parts(tmp_path):
    # Long and short responses in turn (reference lengths: words -> tokens, + EOS, capped at 12), so a static
    # batch runs for its longest and continuous batching refills the rows that finished.
    words = [12, 1, 11, 2, 10, 1, 12, 3, 9, 1, 12, 2]
    records = [{"instruction": f"Say {n} words.", "input": "", "output": " ".join(["word"] * n)} for n in words]
    (tmp_path / "alpaca_5k.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    from llmwatts.server.engine import JOIN_GRAPH_TOKENS  # the default join size: rows without a suffix

    results = run_bench("continuous.py", tmp_path, "--data-dir", str(tmp_path), "--join-tokens", f"{JOIN_GRAPH_TOKENS},0",
                        timeout_s=600)
    rows = {(r["part"], r["batch"], r["mode"]): r for r in results["rows"]}
    eager, cc = " (eager joins)", "continuous-captured"
    assert set(rows) == {("engine", 2, "static"), ("engine", 2, "continuous"), ("engine", 4, "static"),
                         ("engine", 4, "continuous"), ("engine", 4, "continuous-join2"), ("server", 2, "merge"),
                         ("server", 2, cc), ("server", 4, "merge"), ("server", 4, cc),
                         ("engine", 2, "continuous" + eager), ("engine", 4, "continuous" + eager),
                         ("engine", 4, "continuous-join2" + eager), ("server", 2, cc + eager),
                         ("server", 4, cc + eager)}
    assert all("error" not in r and r["tok_s"] > 0 and r["captures"] == 0 for r in rows.values()), rows
    for b in (2, 4):  # the batcher's own account of the timed run: every token came from a step or a join
        loop = rows[("server", b, cc)]["loop"]
        assert loop["joins"] >= 1 and 0 < loop["live_rows"] / loop["steps"] <= b
        assert loop["live_rows"] + loop["joined_rows"] >= rows[("server", b, cc)]["tokens"]
    for b in (2, 4):
        static, continuous = rows[("engine", b, "static")], rows[("engine", b, "continuous")]
        assert static["tokens"] == continuous["tokens"]  # the same requests, every token asked for
        assert continuous["steps"] < static["steps"]     # rows that finished were refilled
        # graphed or eager, a join admits the same requests at the same step
        assert rows[("engine", b, "continuous" + eager)]["steps"] == continuous["steps"]
    assert rows[("server", 4, "merge")]["mean_batch"] > 1  # the baseline really merged


def test_stream_bench_runs_unary_and_both_stream_modes_in_one_run(tmp_path):
    records = [{"instruction": f"Say {n} words.", "input": "", "output": "word"} for n in range(24)]
    (tmp_path / "alpaca_5k.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    results = run_bench("stream.py", tmp_path, "--data-dir", str(tmp_path), timeout_s=600)
    rows = {r["mode"]: r for r in results["rows"]}
    assert set(rows) == {"unary", "stream-per-step", "stream"}
    assert all("error" not in r and r["tokens"] == 16 * 12 and r["tok_s"] > 0 for r in rows.values()), rows
    assert rows["unary"]["chunks_s"] == 0 and "ttft_p50_ms" not in rows["unary"]
    for mode in ("stream-per-step", "stream"):  # every streamed token carried its server time
        assert rows[mode]["chunks_s"] > 0 and rows[mode]["ttft_p50_ms"] > 0 and rows[mode]["itl_p50_ms"] >= 0
    assert rows["stream-per-step"]["stream_interval_ms"] == 0 and rows["stream"]["stream_interval_ms"] > 0


def test_server_host_bench_runs_the_engine_and_both_server_paths_with_their_host_time(tmp_path):
    records = [{"instruction": f"Say {n} words.", "input": "", "output": "one two three"} for n in range(24)]
    (tmp_path / "alpaca_5k.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    results = run_bench("server_host.py", tmp_path, "--data-dir", str(tmp_path), timeout_s=600)
    rows = {r["mode"]: r for r in results["rows"]}
    assert set(rows) == {"engine", "unary", "stream"}
    for r in rows.values():  # the same requests; every step timed, the host's time outside the forward too
        assert "error" not in r and r["tokens"] == rows["engine"]["tokens"] and r["tok_s"] > 0, r
        assert r["steps"] > 0 and r["forward_ms"] > 0 and "host_ms" in r and "host_cpu_ms" in r
    assert rows["stream"]["ttft_p50_ms"] > 0 and rows["unary"]["meter_cpu_ms"] > 0


def test_continuous_bench_refuses_bad_join_tokens(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "continuous.py"), "--quick", "--join-tokens", "8,x"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--join-tokens takes integers, got '8,x'" in done.stderr and "Traceback" not in done.stderr


def test_sim_model_prints_the_cap_table(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "sim_model.py"), "--profile", "a100-250w"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Simulated" in done.stdout and "| 175 | 1151 | 175 | +6.8% | -23.7% |" in done.stdout


def test_clocks_readonly_check_lists_clocks_loads_and_tables_the_reasons(tmp_path):
    """The lead's read-only GPU check (issue 22), on its CPU path: clocks get, a load, the reasons table."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "clocks_readonly.py"), "--quick", "--json",
                           str(tmp_path / "out.json")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "$ llmwatts clocks get" in done.stdout and "1410 down to 210 MHz" in done.stdout
    assert "SIMULATED GPU" in done.stdout
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["backend"] == "simulated" and out["gpus"][0]["supported"]["1215"][0] == 1410
    assert [r["batch"] for r in out["load"]] == [1, 64] and all(r["requests"] > 0 for r in out["load"])
    reasons = {r["reasons"]: r for r in out["reasons"]}
    assert reasons["idle"]["mem_clock_mhz"] == 405 and reasons["none"]["sm_clock_mhz"] == 1410
