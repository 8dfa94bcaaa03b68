"""Control.ExportRecords: a real server (tiny, CPU, simulated GPU) on port 0, pulled into a mirror DB that
must equal the server's own DB file, incrementally, resumably, and only with the control token."""

import sqlite3

import grpc
import pytest
from tests.conftest import start_server

from llmwatts.analysis.pull import pull_records
from llmwatts.errors import InvalidArgument, Unauthenticated
from llmwatts.client import client_channel
from llmwatts.server.export import TABLES, decode_cursor
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

TOKEN = "export-test-token"


def _table(path, table):
    conn = sqlite3.connect(str(path))
    try:
        return sorted(conn.execute(f"select * from {table}").fetchall(), key=repr)
    finally:
        conn.close()


def _generate(channel, run_id, n):
    control, inference = pb_grpc.ControlStub(channel), pb_grpc.InferenceStub(channel)
    secret = control.BeginRun(pb.BeginRunRequest(run_id=run_id, labels={"cap_w": "250"})).run_secret
    for i in range(n):
        inference.Generate(pb.GenerateRequest(request_id=f"{run_id}-{i}", run_id=run_id, prompts=["Hi there", "Two"],
                                              max_new_tokens=3, ignore_eos=True, run_secret=secret))
    control.EndRun(pb.EndRunRequest(run_id=run_id, run_secret=secret))


@pytest.fixture
def served(tmp_path):
    srv, port = start_server(tmp_path, control_token=TOKEN)
    target = f"127.0.0.1:{port}"
    channel = client_channel(target, token=TOKEN)
    yield srv, target, channel, tmp_path
    channel.close()
    srv.stop(1)


def test_pull_mirrors_the_server_db_incrementally(served):
    """The mirror equals the server DB table by table, after a first pull and after a second one that
    brings only what is new (an ended run's marker included); tiny pages exercise the paging."""
    srv, target, channel, tmp = served
    mirror = tmp / "mirror.db"
    _generate(channel, "r1", 2)
    first = pull_records(target, mirror, channel=channel, page_rows=3)
    assert first.rows["requests"] == 2 and first.rows["batches"] >= 1 and first.rows["telemetry"] > 0
    _generate(channel, "r2", 3)
    srv.host.store.flush()
    second = pull_records(target, mirror, channel=channel, page_rows=3)
    assert second.rows["requests"] == 3  # only the new ones
    srv.host.sampler.stop()  # telemetry stops growing, so the last pull sees the final DB
    srv.host.store.flush()
    pull_records(target, mirror, channel=channel, page_rows=3)
    for table in TABLES:
        assert _table(mirror, table) == _table(tmp / "server.db", table), table
    runs = dict((r[0], r[3]) for r in _table(mirror, "runs"))
    assert runs["r1"] and runs["r2"]  # end markers arrived


def test_a_pull_stopped_midway_resumes_without_duplicates(served):
    """Guards the resume: a stream cut after some pages leaves the mirror at the last written page's cursor,
    and the next pull neither repeats nor misses a row."""
    srv, target, channel, tmp = served
    mirror = tmp / "mirror.db"
    _generate(channel, "r1", 4)
    srv.host.sampler.stop()
    srv.host.store.flush()
    from llmwatts.analysis import pull

    written = []
    original = pull._write_page

    def cut(conn, tgt, page):
        if len(written) == 4:
            raise KeyboardInterrupt
        original(conn, tgt, page)
        written.append(page.table)

    pull._write_page = cut
    try:
        with pytest.raises(KeyboardInterrupt):
            pull_records(target, mirror, channel=channel, page_rows=2)
    finally:
        pull._write_page = original
    pull_records(target, mirror, channel=channel, page_rows=2)
    for table in TABLES:
        assert _table(mirror, table) == _table(tmp / "server.db", table), table


def test_export_needs_the_control_token(served):
    """Records are the study owner's: a call without the control token is refused, with a readable error."""
    _, target, _, tmp = served
    anonymous = grpc.insecure_channel(target)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.ControlStub(anonymous).ExportRecords(pb.ExportRecordsRequest()))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(Unauthenticated, match="LLMWATTS_CONTROL_TOKEN"):
            pull_records(target, tmp / "m.db", channel=anonymous)
    finally:
        anonymous.close()


def test_bad_cursor_and_page_size_are_invalid_argument(served):
    _, _, channel, _ = served
    stub = pb_grpc.ControlStub(channel)
    for request in (pb.ExportRecordsRequest(cursor="not a cursor"), pb.ExportRecordsRequest(page_rows=10**6)):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ExportRecords(request))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        decode_cursor("x" * 5000)
