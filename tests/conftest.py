"""Shared fixtures: a real llmwatts server (tiny preset, CPU, simulated GPU) on port 0."""

import os
from pathlib import Path

import grpc
import platformdirs
import pytest
import sqlite_utils
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmwatts.server.config import ServerConfig
from llmwatts.server.service import create_server
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def cache_dir_for_tests() -> Path:
    """The tests' own cache: $LLMWATTS_CACHE_DIR, else ``llmwatts-tests`` in the user cache dir, which
    honours $XDG_CACHE_HOME (platformdirs), never a hard-coded ~/.cache."""
    return Path(os.environ.get("LLMWATTS_CACHE_DIR") or platformdirs.user_cache_dir("llmwatts-tests"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the tokenizer cache per test session unless the user points elsewhere (CI starts empty)."""
    os.environ["LLMWATTS_CACHE_DIR"] = str(cache_dir_for_tests())


def start_server(tmp_path: Path, **overrides):
    settings = dict(model="tiny", device="cpu", power_backend="simulated", port=0, db_path=tmp_path / "server.db",
                    telemetry_hz=20)
    config = ServerConfig(**{**settings, **overrides})
    server, port = create_server(config)
    server.start()
    return server, port


def serving(channel) -> int:
    """The server's overall health status (``HealthCheckResponse.SERVING`` ...)."""
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def db_of(srv) -> sqlite_utils.Database:
    """The server DB of ``srv`` (a started server), its buffered rows written first."""
    srv.host.store.flush()
    return sqlite_utils.Database(srv.host.config.db_path)


@pytest.fixture
def server(tmp_path):
    """A started server; yields (server, target)."""
    srv, port = start_server(tmp_path)
    yield srv, f"127.0.0.1:{port}"
    srv.stop(1)


@pytest.fixture
def stubs(server):
    srv, target = server
    channel = grpc.insecure_channel(target)
    yield pb_grpc.InferenceStub(channel), pb_grpc.ControlStub(channel), srv
    channel.close()
