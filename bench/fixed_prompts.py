"""Prompts of an exact token count, shared by the benchmarks (imported by ``engine.py`` and ``sharding.py``
as a sibling module: they run as scripts, with ``bench/`` first on ``sys.path``)."""

WORDS = "energy power token model batch server latency watt joule cache graph decode prefill".split()


def fixed_length_prompts(tokenizer, n_tokens: int, count: int) -> tuple[list[str], list[list[int]]]:
    """``count`` distinct texts that ``tokenizer`` turns into exactly ``n_tokens`` ids (BOS included).
    Text ``i`` does not depend on ``count``, so the first ``b`` texts are the prompts of batch ``b``."""

    def n_ids(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    word_tokens_max = max(n_ids(f"0 {w}") - n_ids("0") for w in WORDS)
    texts, ids = [], []
    for i in range(count):
        text, k = f"{i}", i
        while (short_tokens := n_tokens - n_ids(text)) > 0:
            # Several words per tokenizer call while far from the target (each adds at most
            # word_tokens_max ids), one at a time near it: ~log(n) calls per prompt instead of ~n.
            candidate = text
            for _ in range(max(1, short_tokens // (2 * word_tokens_max))):
                k = k * 7 + 3
                candidate += f" {WORDS[k % len(WORDS)]}"
            text = candidate if n_ids(candidate) <= n_tokens else f"{text} a"
        if n_ids(text) != n_tokens:  # " a" overshot by a merge
            raise RuntimeError(f"could not build a prompt of exactly {n_tokens} tokens")
        texts.append(text)
        ids.append(tokenizer(text)["input_ids"])
    return texts, ids
