"""A run's telemetry is in the server DB file when EndRun answers (a real server: tiny, CPU, simulated GPU).

Guards the bug where the telemetry sampler wrote its buffer only every 2 s (``FLUSH_EVERY_S``) or every
256 rows: the server DB file read right after EndRun (``make demo``'s last run, ``llmwatts report`` on the
file of a running server, a pull racing the sampler) lacked up to the run's last 2 s of samples.
"""

import sqlite3
import time

import grpc
from tests.conftest import start_server

from llmwatts.analysis.pull import pull_records
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

HZ = 50


def _window_samples(path, begin_ns: int, end_ns: int) -> tuple[int, int | None]:
    """(samples stamped inside the window, the last one's ts_ns) as a reader of the file sees them."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*), max(ts_ns) FROM telemetry WHERE ts_ns BETWEEN ? AND ?",
                            [begin_ns, end_ns]).fetchone()
    finally:
        conn.close()


def test_end_run_answers_with_the_whole_windows_telemetry_in_the_db_file(tmp_path):
    srv, port = start_server(tmp_path, telemetry_hz=HZ, control_token="a-control-token-for-tests")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        control, inference = pb_grpc.ControlStub(channel), pb_grpc.InferenceStub(channel)
        time.sleep(0.5)  # past the sampler's first periodic flush, so the window's samples sit in the buffer
        begun = control.BeginRun(pb.BeginRunRequest(run_id="last-run"))
        inference.Generate(pb.GenerateRequest(request_id="last-run-0", run_id="last-run", prompts=["Hi there"],
                                              max_new_tokens=4, ignore_eos=True, run_secret=begun.run_secret))
        time.sleep(0.4)  # some idle time inside the window too
        ended = control.EndRun(pb.EndRunRequest(run_id="last-run", run_secret=begun.run_secret))
        seen, last_ns = _window_samples(srv.host.config.db_path, begun.server_ns, ended.server_ns)
        srv.host.sampler.stop()  # writes whatever it still held
        whole, _ = _window_samples(srv.host.config.db_path, begun.server_ns, ended.server_ns)
    finally:
        channel.close()
        srv.stop(1)
    assert seen == whole and whole >= 0.4 * HZ
    assert ended.server_ns - last_ns <= 3e9 / HZ  # the samples reach the window's end


def test_a_pull_right_after_end_run_holds_the_whole_window(tmp_path):
    """EndRun and ExportRecords write the sampler's pass in progress too (``TelemetrySampler.flush``), not
    only the store's buffer: the study's pull after a cell's EndRun misses none of the window's samples.
    The GPU's read is slowed as NVML's is (~4 ms a GPU: a pass over 8 GPUs ~30 ms), so a pass's samples are
    stamped well before they reach the store."""
    token = "a-control-token-for-tests"
    srv, port = start_server(tmp_path, telemetry_hz=HZ, control_token=token)
    target = f"127.0.0.1:{port}"
    gpu = srv.host.sampler.gpus[0]
    read = gpu.sample

    def slow_sample():
        sample = read()
        time.sleep(0.03)
        return sample

    gpu.sample = slow_sample
    try:
        control = pb_grpc.ControlStub(grpc.insecure_channel(target))
        begun = control.BeginRun(pb.BeginRunRequest(run_id="pulled"))
        time.sleep(0.3)
        ended = control.EndRun(pb.EndRunRequest(run_id="pulled", run_secret=begun.run_secret))
        pull_records(target, tmp_path / "mirror.db", token=token)
        pulled, _ = _window_samples(tmp_path / "mirror.db", begun.server_ns, ended.server_ns)
        srv.host.sampler.stop()
        whole, _ = _window_samples(srv.host.config.db_path, begun.server_ns, ended.server_ns)
    finally:
        srv.stop(1)
    assert pulled == whole > 0
