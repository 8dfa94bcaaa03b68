"""``--merge-requests`` under the default sampling, where every request carries its own sampler seed."""

import concurrent.futures

import grpc

from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc
from tests.conftest import start_server


def test_requests_with_different_seeds_merge_and_each_samples_what_it_samples_alone(tmp_path):
    """Issue 17 defect 2: only requests with identical sampling merged, and every request of the default
    load has its own seed, so ``--merge-requests`` never merged. Now they share one batch, and each
    request's tokens are those it gets when it runs alone with its seed."""
    srv, port = start_server(tmp_path, engine="fast", merge_requests=True, batch_wait_ms=1500, telemetry_hz=0)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def call(rid: str, seed: int, prompts: list[str]):
            return stub.Generate(pb.GenerateRequest(
                request_id=rid, run_id="run", prompts=prompts, max_new_tokens=6, ignore_eos=True,
                return_token_ids=True, sampling=pb.SamplingParams(seed=seed)), timeout=120)

        asks = {1: ["Tell me a story", "about a cat"], 2: ["What is energy?"], 3: ["Watts and joules"]}
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            merged = dict(zip(asks, pool.map(lambda s: call(f"merged-{s}", s, asks[s]), asks)))
        assert len({r.batch_id for r in merged.values()}) == 1  # one batch of three seeds
        for seed, prompts in asks.items():
            alone = call(f"alone-{seed}", seed, prompts)
            assert alone.batch_id != merged[seed].batch_id
            assert [list(c.token_ids) for c in alone.completions] == [list(c.token_ids) for c in merged[seed].completions]
    finally:
        srv.stop(1)
