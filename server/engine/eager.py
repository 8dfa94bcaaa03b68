"""``EagerEngine``: transformers' own ``generate`` with a dynamic cache, the paper-faithful baseline."""

import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from llmwatts.server.engine.batch import (BatchOutput, BatchSpec, PaceCallback, SequenceTracker, StepCallback,
                                          left_pad)


class _StepStreamer(BaseStreamer):
    """Receives each step's tokens from ``generate`` and hands them to the tracker and callbacks."""

    def __init__(self, tracker: SequenceTracker, on_step: StepCallback | None, pace: PaceCallback | None):
        self.tracker, self.on_step, self.pace = tracker, on_step, pace
        self.prompt_seen = False
        self.last = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first streams the prompt itself
            self.prompt_seen = True
            return
        new_ids = value.reshape(-1).tolist()  # [B]
        if self.pace is not None:
            self.pace(time.perf_counter() - self.last)
        deltas = self.tracker.step(new_ids)
        if self.on_step is not None:
            self.on_step(self.tracker.steps - 1, deltas)
        self.last = time.perf_counter()

    def end(self) -> None:
        pass


class _StopWhenTracked(StoppingCriteria):
    """Stop ``generate`` once every sequence reached its own limit or EOS (limits differ when merged)."""

    def __init__(self, tracker: SequenceTracker):
        self.tracker = tracker

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.tracker.all_done, dtype=torch.bool, device=input_ids.device)


class EagerEngine:
    """transformers ``generate`` with a dynamic cache: the paper-faithful baseline."""

    name = "eager"

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int | None, device: torch.device):
        self.model, self.pad_id, self.eos_id, self.device = model, pad_token_id, eos_token_id, device

    @torch.inference_mode()
    def generate(self, batch: BatchSpec, on_step: StepCallback | None = None,
                 pace: PaceCallback | None = None) -> BatchOutput:
        tracker = SequenceTracker(batch, self.eos_id)
        ids, mask = left_pad(batch.prompts, self.pad_id, self.device)
        max_new = max(batch.max_new_tokens)
        s = batch.sampling
        kwargs = dict(do_sample=False) if s.greedy else dict(
            do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        if batch.ignore_eos:
            kwargs["min_new_tokens"] = max_new  # suppress EOS: exactly max_new tokens per sequence
        self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, streamer=_StepStreamer(tracker, on_step, pace),
            stopping_criteria=StoppingCriteriaList([_StopWhenTracked(tracker)]), **kwargs,
        )
        return tracker.output()
