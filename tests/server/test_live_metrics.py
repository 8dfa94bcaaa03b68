"""``serve --metrics-port``: a real server (tiny, CPU, simulated GPU) scraped over HTTP with urllib and
parsed with prometheus_client's own parser."""

import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from llmwatts.client import client_channel
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc
from tests.conftest import start_server


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples, name, **labels):
    return [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def test_metrics_scrape_shows_gpus_requests_and_in_flight_calls(tmp_path):
    srv, port = start_server(tmp_path, metrics_port=0)
    channel = client_channel(f"127.0.0.1:{port}")
    try:
        inference = pb_grpc.InferenceStub(channel)
        families = _scrape(srv.metrics.port)
        gpu = srv.host.gpus[0]
        for name in ("llmwatts_gpu_power_watts", "llmwatts_gpu_power_cap_watts", "llmwatts_gpu_sm_percent",
                     "llmwatts_gpu_memory_controller_percent"):
            (value,) = _value(families[name], name, gpu_uuid=gpu.uuid, simulated="1")
            assert value >= 0
        assert _value(families["llmwatts_gpu_power_cap_watts"], "llmwatts_gpu_power_cap_watts")[0] > 0
        energy_before = _value(families["llmwatts_gpu_energy_joules"], "llmwatts_gpu_energy_joules_total")[0]
        assert _value(families["llmwatts_inflight_requests"], "llmwatts_inflight_requests") == [0]
        assert _value(families["llmwatts_queue_depth"], "llmwatts_queue_depth") == [0]

        for i in range(2):
            inference.Generate(pb.GenerateRequest(request_id=f"m{i}", run_id="m", prompts=["Hello"],
                                                  max_new_tokens=5, ignore_eos=True))
        # A long call in flight while we scrape.
        long_call = threading.Thread(target=lambda: inference.Generate(pb.GenerateRequest(
            request_id="long", run_id="m", prompts=["Hello"] * 4, max_new_tokens=200, ignore_eos=True)))
        long_call.start()
        seen_in_flight = 0
        for _ in range(50):
            families = _scrape(srv.metrics.port)
            seen_in_flight = max(seen_in_flight, _value(families["llmwatts_inflight_requests"],
                                                        "llmwatts_inflight_requests")[0])
            if seen_in_flight:
                break
        long_call.join()
        assert seen_in_flight == 1
        families = _scrape(srv.metrics.port)
        assert _value(families["llmwatts_requests"], "llmwatts_requests_total", status="ok") == [3]
        assert _value(families["llmwatts_output_tokens"], "llmwatts_output_tokens_total") == [2 * 5 + 4 * 200]
        assert _value(families["llmwatts_tokens_per_second"], "llmwatts_tokens_per_second")[0] > 0
        assert _value(families["llmwatts_gpu_energy_joules"], "llmwatts_gpu_energy_joules_total")[0] > energy_before
    finally:
        channel.close()
        srv.stop(1)
