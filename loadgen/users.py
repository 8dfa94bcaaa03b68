"""``LlmUser``: replays the run's prompts against ``Inference.Generate``/``GenerateStream``.

Each request takes the next request number from the session (so ``--requests N`` is exact and request
``k`` carries prompts ``k*B .. k*B+B-1``), gets a fresh client-made ``request_id``, and leaves exactly one
row in the client records, whatever happens to the call.

Importing this module registers the ``--llm-*`` options and the session wiring with Locust's global
events, so ``locust -f loadgen/locustfile.py`` works headless, in the web UI and distributed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import gevent
import grpc
from locust import events

from llmwatts.loadgen import session as session_mod
from llmwatts.loadgen.config import add_locust_arguments
from llmwatts.client import inference_token
from llmwatts.loadgen.grpc_user import ChannelOptions, GrpcUser
from llmwatts.loadgen.latency import ChunkClock, stream_latency
from llmwatts.loadgen.records import ClientRequest
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

IDLE_S = 0.5  # how often a user whose run is used up checks back


@events.init_command_line_parser.add_listener
def _add_arguments(parser, **_kw):
    add_locust_arguments(parser)


@events.init.add_listener
def _on_init(environment, **_kw):
    session_mod.install(environment, token=inference_token())


class LlmUser(GrpcUser):
    """Closed loop: each user sends its next request when the previous one has returned. Open loop
    (``--rate``): users are the concurrency slots; each free user takes the next due arrival."""

    abstract = True
    stub_class = pb_grpc.InferenceStub

    def __init__(self, environment):
        self.session: session_mod.LoadSession = environment.llmwatts
        self._due: tuple[int, int] | None = None   # (perf_ns, wall_ns) of the arrival this user claimed
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
            run_secret=self.session.run_secret,
            prompts=self.session.prompts.batch(seq, c.batch_size),
            sampling=sampling,
            ignore_eos=c.ignore_eos,
        )
        if c.max_new_tokens is not None:
            request.max_new_tokens = c.max_new_tokens
        return request

    def wait_time(self) -> float:
        """Closed loop: 0 (send when the last reply is in). Open loop (``--rate``): claim the run's next
        arrival and wait until it is due. Locust calls this with the user WAITING, so a stop never waits for
        an arrival that is not due yet; an arrival claimed late is sent at once and its lag recorded."""
        schedule = self.session.schedule
        if schedule is None:
            return 0.0
        self._due = schedule.next_due()
        return max(0.0, (self._due[0] - time.perf_counter_ns()) / 1e9)

    def generate(self):
        """The task: one request of the run (a locustfile lists it in ``tasks``)."""
        due, self._due = self._due, None
        if self.session.schedule is not None and due is None:
            return  # a user's first task: its first arrival is claimed by wait_time, like every later one
        while due is not None and (early_ns := due[0] - time.perf_counter_ns()) > 0:
            gevent.sleep(early_ns / 1e9)  # libev times its timers from a cached loop clock: they may wake early
        seq = self.session.take_permit()
        if seq is None:
            gevent.sleep(IDLE_S)
            return
        c = self.session.config
        request = self.build_request(seq)
        context = {"request_id": request.request_id, "run_id": request.run_id, "batch_size": c.batch_size}
        clock = ChunkClock(start_perf_ns=time.perf_counter_ns())
        request.client_send_ns = time.time_ns()
        outcome = None
        try:
            outcome = self._call(request, clock, context)
        except Exception as e:  # a load-generator bug: still one row, and Locust logs the traceback
            outcome = Outcome.now("INTERNAL", f"load generator error: {e!r}")
            raise
        finally:
            # Exactly one record per request, also when the user is killed mid-call (status CANCELLED).
            outcome = outcome or Outcome.now("CANCELLED", "stopped by the load generator before the reply")
            self.session.record(self._record(request, clock, outcome, due), clock.chunks(request.request_id))
        if outcome.status == "UNAUTHENTICATED":  # every later call would be refused too: stop the run
            self.session.token_refused()

    def _call(self, request, clock: ChunkClock, context: dict) -> Outcome:
        """Run the call; an RPC error is an outcome like a reply."""
        try:
            if self.session.config.stream:
                final = self._stream(request, clock, context)
            else:
                final = self.client.unary("Generate", request, context=context)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            return Outcome.now(code.name if code else "UNKNOWN",
                               (e.details() if hasattr(e, "details") else None) or str(e))
        return Outcome.now("ok", None, final)

    def _stream(self, request, clock: ChunkClock, context) -> pb.GenerateResponse:
        final = None
        for chunk, perf_ns, wall_ns in self.client.stream("GenerateStream", request, context=context,
                                                          is_final=lambda ch: ch.done):
            tokens = max((len(d.token_ids) for d in chunk.deltas), default=0)
            if tokens or any(d.text for d in chunk.deltas):
                # Every sequence of a request moves in the same steps: the union of their stamps is the steps.
                steps = sorted({t for d in chunk.deltas for t in d.token_server_ns})
                clock.add(perf_ns, wall_ns, tokens, steps)
            if chunk.done:
                final = chunk.final
        return final

    def _record(self, request, clock: ChunkClock, outcome: Outcome, due) -> ClientRequest:
        """The request's one client row, built in one place from the call's outcome and chunk times."""
        session, final = self.session, outcome.final
        latency_ms = (outcome.done_perf_ns - clock.start_perf_ns) / 1e6
        completions = list(final.completions) if final is not None else []
        longest = max((x.output_tokens for x in completions), default=None)
        lat = stream_latency(clock.elapsed_ms(), latency_ms, longest if outcome.status == "ok" else None,
                             clock.steps_server_ns())
        return ClientRequest(
            request_id=request.request_id, run_id=request.run_id, worker=session.worker_name,
            dataset=session.dataset, batch_size=len(request.prompts), stream=int(session.config.stream),
            client_send_ns=request.client_send_ns, first_token_ns=clock.arrival_ns[0] if clock.arrival_ns else None,
            done_ns=outcome.done_ns, latency_ms=latency_ms, ttft_ms=lat.ttft_ms,
            prompt_tokens=sum(x.prompt_tokens for x in completions) if final is not None else None,
            output_tokens=sum(x.output_tokens for x in completions) if final is not None else None,
            output_words=sum(len(x.text.split()) for x in completions) if final is not None else None,
            status=outcome.status, error=outcome.error, batch_id=final.batch_id if final is not None else None,
            clock_offset_ns=session.clock_offset_ns, scheduled_send_ns=due[1] if due else None,
            longest_output_tokens=longest, tpot_ms=lat.tpot_ms, itl_count=lat.itl_count,
            itl_mean_ms=lat.itl_mean_ms, itl_p50_ms=lat.itl_p50_ms, itl_p99_ms=lat.itl_p99_ms,
            itl_max_ms=lat.itl_max_ms, itl_source=lat.itl_source,
        )


@dataclass(frozen=True)
class Outcome:
    """How a call ended: status (``ok`` or a gRPC code name), error text, the final response, end times."""

    status: str
    error: str | None
    final: pb.GenerateResponse | None
    done_perf_ns: int
    done_ns: int

    @classmethod
    def now(cls, status: str, error: str | None, final: pb.GenerateResponse | None = None) -> Outcome:
        return cls(status, error, final, time.perf_counter_ns(), time.time_ns())
