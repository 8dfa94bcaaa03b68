"""Warm-up: every compile and graph capture a server will meet, run before its first request."""

from llmwatts.server.engine.batch import BatchSpec, Sampling
from llmwatts.server.engine.cache import bucket


def warm_up(engine, max_batch_size: int, token: int, continuous: bool = False, cache_slots: int = 0) -> int:
    """Run every batch bucket up to ``max_batch_size`` once (a one-token prompt, two new tokens), and with
    ``continuous`` a session over every row prefix, so that their compiles (seconds each on a GPU; one per
    bucket) happen now and not in the first requests that meet them (``llmwatts serve --warmup``). With
    ``continuous`` and ``cache_slots`` (the sessions' cache length) the session also captures its decode
    step for every row prefix and attention window (``ContinuousSession.capture_steps``): a continuous
    batch meets them in no particular order, and each first meeting would stall every live row. Other
    graphs are still captured at first use. Only ``engine.generate`` and ``engine.session``: a sharded
    engine runs it on every rank. -> the runs."""
    greedy = Sampling(greedy=True)
    sizes = sorted({min(bucket(n), max_batch_size) for n in range(1, max_batch_size + 1)})
    for n in sizes:
        engine.generate(BatchSpec([[token]] * n, [2] * n, greedy, ignore_eos=True))
    if not continuous:
        return len(sizes)
    session = engine.session(max_batch_size, max(cache_slots, 3), greedy, ignore_eos=True)
    for n in sizes:  # n prompts fill rows 0 .. n-1: the steps run over row prefix bucket(n)
        session.admit({"warm-up": BatchSpec([[token]] * n, [2] * n, greedy, ignore_eos=True)})
        while session.busy:
            session.step()
        session.pop("warm-up")
    if cache_slots:
        session.capture_steps()
    return 2 * len(sizes)
