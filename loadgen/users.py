"""``LlmUser``: replays the run's prompts against ``Inference.Generate``/``GenerateStream``.

Each request takes the next request number from the session (so ``--requests N`` is exact and request
``k`` carries prompts ``k*B .. k*B+B-1``), gets a fresh client-made ``request_id``, and leaves exactly one
row in the client records, whatever happens to the call.

Importing this module registers the ``--llm-*`` options and the session wiring with Locust's global
events, so ``locust -f loadgen/locustfile.py`` works headless, in the web UI and distributed.
"""

from __future__ import annotations

import os
import time
import uuid

import gevent
import grpc
from locust import constant, events

from llmwatts.loadgen import session as session_mod
from llmwatts.loadgen.config import add_locust_arguments
from llmwatts.loadgen.grpc_user import INFERENCE_TOKEN_ENV, ChannelOptions, GrpcUser
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

IDLE_S = 0.5  # how often a user whose run is used up checks back


@events.init_command_line_parser.add_listener
def _add_arguments(parser, **_kw):
    add_locust_arguments(parser)


@events.init.add_listener
def _on_init(environment, **_kw):
    session_mod.install(environment, token=os.environ.get(INFERENCE_TOKEN_ENV))


class LlmUser(GrpcUser):
    """Closed loop: each user sends its next request when the previous one has returned."""

    abstract = True
    stub_class = pb_grpc.InferenceStub
    wait_time = constant(0)

    def __init__(self, environment):
        self.session: session_mod.LoadSession = environment.llmwatts
        self.deadline_s = self.session.config.deadline_s
        super().__init__(environment)

    def channel_options(self) -> ChannelOptions:
        return self.session.channel_options(self.host)

    def build_request(self, seq: int) -> pb.GenerateRequest:
        c = self.session.config
        sampling = pb.SamplingParams(greedy=True) if c.greedy else pb.SamplingParams(
            temperature=c.temperature, top_p=c.top_p, seed=c.seed + seq)
        request = pb.GenerateRequest(
            request_id=uuid.uuid4().hex,
            run_id=self.session.run_id,
            prompts=self.session.prompts.batch(seq, c.batch_size),
            sampling=sampling,
            ignore_eos=c.ignore_eos,
        )
        if c.max_new_tokens is not None:
            request.max_new_tokens = c.max_new_tokens
        return request

    def generate(self):
        """The task: one request of the run (a locustfile lists it in ``tasks``)."""
        seq = self.session.take_permit()
        if seq is None:
            gevent.sleep(IDLE_S)
            return
        c = self.session.config
        request = self.build_request(seq)
        row = {
            "request_id": request.request_id, "run_id": request.run_id, "worker": self.session.worker_name,
            "dataset": self.session.dataset, "batch_size": len(request.prompts), "stream": int(c.stream),
            "status": "CANCELLED", "error": "stopped by the load generator before the reply",
        }
        context = {"request_id": request.request_id, "run_id": request.run_id, "batch_size": c.batch_size}
        start_perf_ns = time.perf_counter_ns()
        request.client_send_ns = row["client_send_ns"] = time.time_ns()
        try:
            if c.stream:
                final = self._stream(request, row, start_perf_ns, context)
            else:
                final = self.client.unary("Generate", request, context=context)
            row["done_ns"] = time.time_ns()
            row["latency_ms"] = (time.perf_counter_ns() - start_perf_ns) / 1e6
            row["batch_id"] = final.batch_id
            row["prompt_tokens"] = sum(x.prompt_tokens for x in final.completions)
            row["output_tokens"] = sum(x.output_tokens for x in final.completions)
            row["output_words"] = sum(len(x.text.split()) for x in final.completions)
            row["status"], row["error"] = "ok", None
        except grpc.RpcError as e:
            row["done_ns"] = time.time_ns()
            row["latency_ms"] = (time.perf_counter_ns() - start_perf_ns) / 1e6
            code = e.code() if hasattr(e, "code") else None
            row["status"] = code.name if code else "UNKNOWN"
            row["error"] = (e.details() if hasattr(e, "details") else None) or str(e)
        except Exception as e:  # a client-side bug: still one row, and Locust logs the traceback
            row["status"], row["error"] = "INTERNAL", f"load generator error: {e!r}"
            raise
        finally:
            # Exactly one row per request, also when the user is killed mid-call (status CANCELLED).
            self.session.record(row)

    def _stream(self, request, row, start_perf_ns, context) -> pb.GenerateResponse:
        final = None
        for chunk, arrival_ns in self.client.stream("GenerateStream", request, context=context):
            if "first_token_ns" not in row and any(d.token_ids or d.text for d in chunk.deltas):
                row["first_token_ns"] = arrival_ns
                row["ttft_ms"] = (time.perf_counter_ns() - start_perf_ns) / 1e6
            if chunk.done:
                final = chunk.final
        if final is None:
            raise _StreamError("the stream ended without a final chunk")
        return final


class _StreamError(grpc.RpcError):
    """A stream that ended without its final chunk: recorded as status INTERNAL."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self):
        return grpc.StatusCode.INTERNAL

    def details(self):
        return self._details
