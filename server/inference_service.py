"""The Inference servicer: validates a request, hands it to the batcher, answers from its events."""

import queue
import time

from llmwatts.errors import AlreadyExists, InvalidArgument, Unavailable
from llmwatts.server.engine import validate_sampling
from llmwatts.server.grpc_errors import mapped
from llmwatts.server.host import Host
from llmwatts.server.streaming import ChunkStream
from llmwatts.server.work import Done, Failed, Result, Work
from llmwatts.server.limits import MAX_REQUEST_ID_CHARS, MAX_RUN_ID_CHARS, check_name, prompt_byte_limit
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc



class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, host: Host):
        self.host = host
        self.tokenizer = host.loaded.tokenizer
        self.streams = ChunkStream(self.tokenizer, host.loaded.eos_token_id, host.config.stream_interval_ms,
                                   self._response, self._failed)

    def _work(self, request: pb.GenerateRequest, stream: bool, context) -> Work:
        """The request checked (bounds first, then the cheap byte bound, then tokenized) and claimed in
        the store; refusals are counted in the store."""
        try:
            work = self._checked(request, stream)
        except InvalidArgument:
            self.host.store.count_refusal("INVALID_ARGUMENT")
            raise
        counted = self.host.runs.admit(work.run_id, request.run_secret)
        if not self.host.store.claim_request(work.row("running", simulated=self.host.simulated)):
            if counted:
                self.host.runs.release(work.run_id)
            raise AlreadyExists(f"request_id {request.request_id!r} was already used on this server: make a "
                                f"fresh id per request (only a request refused before any work may be retried)")
        if counted:
            work.on_end = lambda w: self.host.runs.release(w.run_id)
        if not context.add_callback(lambda: self._call_ended(work, context)):
            self._call_ended(work, context)
        return work

    def _call_ended(self, work: Work, context) -> None:
        """The call ended (any way); one ended before its answer takes its request out of the batcher."""
        if not work.ended:
            remaining = context.time_remaining()
            self.host.batcher.cancel(work, "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0
                                     else "CANCELLED")

    def _checked(self, request: pb.GenerateRequest, stream: bool) -> Work:
        received_ns = time.time_ns()
        cfg = self.host.config
        check_name(request.request_id, "request_id (the client must make a unique id per request)",
                   MAX_REQUEST_ID_CHARS)
        check_name(request.run_id, "run_id", MAX_RUN_ID_CHARS, required=False)
        if not request.prompts:
            raise InvalidArgument("prompts is empty: send at least one prompt per request")
        if len(request.prompts) > cfg.max_batch_size:
            raise InvalidArgument(f"batch of {len(request.prompts)} prompts exceeds the server's limit of "
                                  f"{cfg.max_batch_size} (--max-batch-size); split the batch")
        if request.HasField("max_new_tokens"):
            max_new = request.max_new_tokens
            if max_new <= 0 or max_new > cfg.max_new_tokens_limit:
                raise InvalidArgument(f"max_new_tokens must be between 1 and {cfg.max_new_tokens_limit} "
                                      f"(--max-new-tokens-limit), got {max_new}")
        else:
            max_new = cfg.default_max_new_tokens
        s = request.sampling
        try:
            sampling = validate_sampling(s.temperature if s.HasField("temperature") else None,
                                         s.top_p if s.HasField("top_p") else None, s.greedy,
                                         s.seed if s.HasField("seed") else None)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        prompt_limit = cfg.max_prompt_tokens or (self.host.loaded.context_length - max_new)
        if prompt_limit < 1:
            raise InvalidArgument(f"max_new_tokens {max_new} leaves no room for a prompt in the context of "
                                  f"{self.host.loaded.context_length} tokens: ask for fewer new tokens")
        byte_limit = prompt_byte_limit(prompt_limit, self.host.max_token_bytes)
        for i, p in enumerate(request.prompts):
            if len(p) > byte_limit or len(p.encode("utf-8", "surrogatepass")) > byte_limit:
                raise InvalidArgument(f"prompt {i} is longer than {byte_limit} bytes, far beyond the limit of "
                                      f"{prompt_limit} tokens (context {self.host.loaded.context_length} minus "
                                      f"max_new_tokens {max_new}): shorten it")
            if not p.strip():
                raise InvalidArgument(f"prompt {i} is empty: every prompt needs some text")
        ids = self.tokenizer(list(request.prompts))["input_ids"]
        for i, p in enumerate(ids):
            if len(p) > prompt_limit:
                raise InvalidArgument(
                    f"prompt {i} has {len(p)} tokens; the limit is {prompt_limit} (context "
                    f"{self.host.loaded.context_length} minus max_new_tokens {max_new}): shorten it or ask for "
                    f"fewer new tokens")
        return Work(request.request_id, request.run_id, ids, max_new, sampling, request.ignore_eos, received_ns,
                    stream=stream)

    def _submit(self, work: Work) -> None:
        """Queue ``work``; refused (queue full, shutting down): its row says so and its id may be retried."""
        try:
            self.host.batcher.submit(work)
        except Exception as e:
            self.host.store.record_requests([work.row(getattr(e, "grpc_code", "INTERNAL"), simulated=self.host.simulated,
                                                      error=str(e))])
            work.end(Failed(e))
            raise

    def _events(self, work: Work, context):
        """The batcher's events for ``work``; stops early when the client has gone away."""
        while True:
            try:
                event = work.events.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():  # cancelled or past its deadline: free this thread
                    return
                continue
            if isinstance(event, Failed):
                self._failed(work, event)
            yield event
            if isinstance(event, Done):
                return

    def _failed(self, work: Work, event: Failed) -> None:
        """A ``Failed`` event: its row is written (the batcher, or ``_submit``); the call gets its status."""
        self._raise(event)

    def _response(self, request: pb.GenerateRequest, r: Result) -> pb.GenerateResponse:
        completions = []
        for i, (toks, reason, p_tok) in enumerate(zip(r.tokens, r.finish_reasons, r.prompt_tokens)):
            completions.append(pb.Completion(
                index=i, text=self.tokenizer.decode(toks, skip_special_tokens=True), prompt_tokens=p_tok,
                output_tokens=len(toks), finish_reason=reason,
                token_ids=toks if request.return_token_ids else []))
        return pb.GenerateResponse(
            request_id=request.request_id, run_id=request.run_id, batch_id=r.batch_id, completions=completions,
            times=pb.ServerTimes(received_ns=r.received_ns, batch_start_ns=r.batch_start_ns,
                                 first_token_ns=r.first_token_ns, done_ns=r.done_ns),
            energy_j=r.energy_j, energy_simulated=r.simulated)

    @staticmethod
    def _raise(event: Failed) -> None:
        err = event.error
        if isinstance(err, Exception) and hasattr(err, "grpc_code"):
            raise err
        raise Unavailable(f"the engine failed while running this batch ({type(err).__name__}: {err}); "
                          f"the server is no longer serving")

    @mapped
    def Generate(self, request, context):
        work = self._work(request, stream=False, context=context)
        self._submit(work)
        for event in self._events(work, context):
            if isinstance(event, Done):
                return self._response(request, event.result)
        return pb.GenerateResponse()  # the client left; nobody reads this

    @mapped
    def GenerateStream(self, request, context):
        work = self._work(request, stream=True, context=context)
        self._submit(work)
        yield from self.streams.chunks(request, work, context.is_active)
