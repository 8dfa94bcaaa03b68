"""An offline tokenizer with LLaMA-like granularity for the random-weight presets.

LLaMA's own tokenizer is a 32,000-token SentencePiece BPE with byte fallback. With no hub access we
build one of the same kind deterministically: a byte-fallback BPE (ids 0-2 special, 3-258 the 256 byte
tokens, as in LLaMA), trained with HF ``tokenizers`` on English prose that ships with every Python:
the docstrings of the standard library. The result is cached in the user cache dir. Measured on
Alpaca it gives about 1.66 tokens per whitespace word (LLaMA's tokenizer: about 1.3-1.4), so token counts
are of the right order; a real checkpoint brings its own tokenizer.
"""

import ast
import hashlib
import json
import sys
import sysconfig
import threading
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmwatts.paths import cache_dir

VOCAB_SIZE = 32000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
RECIPE_VERSION = 1
_lock = threading.Lock()


def _corpus() -> list[str]:
    """Docstrings of the standard library's top-level and package modules, in sorted path order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(lib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def _train() -> Tokenizer:
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(BYTE_TOKENS), special_tokens=SPECIAL_TOKENS, limit_alphabet=200,
        show_progress=False,
    )
    learner.train_from_iterator(_corpus(), trainer)
    learned = json.loads(learner.to_str())["model"]
    # Re-number: specials, then the 256 byte tokens, then everything learned (LLaMA's layout).
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    # Pad to exactly VOCAB_SIZE with reserved tokens, should training learn fewer.
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<reserved_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def cache_path() -> Path:
    key = hashlib.sha256(f"{RECIPE_VERSION}-{VOCAB_SIZE}-{sys.version_info[:2]}".encode()).hexdigest()[:12]
    return cache_dir() / f"tokenizer-llama-like-{key}.json"


def llama_like_tokenizer() -> PreTrainedTokenizerFast:
    """The preset tokenizer: built once (a few seconds), then loaded from the cache."""
    path = cache_path()
    with _lock:
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            _train().save(str(tmp))
            tmp.replace(path)
        tok = Tokenizer.from_file(str(path))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        padding_side="left",
    )
    wrapped.add_bos_token = True
    return wrapped
