"""One target parser (issue 18 item 4): what users type as a server address reaches the same rule
(``llmwatts.client.strip_scheme`` / ``parse_target``) through every door: loadgen's Locust host field
(``LoadConfig.from_options``) and ``--target`` / the library's ``LoadConfig(target=...)``
(``LoadConfig.validate``), a study plan's ``[[servers]] target`` and ``report --server`` (``pull_records``).

Guards against loadgen/config.py's own ``_strip_scheme`` (no whitespace strip, scheme case-sensitive, so
``" grpc://h:1"`` reached grpc as a host name) and the ``rpartition`` checks of ``LoadConfig.validate``,
``study/plan.py`` and ``analysis/pull.py`` (port 0 or 99999 and any length passed)."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llmwatts.analysis.pull import pull_records
from llmwatts.client import MAX_TARGET_CHARS, parse_target, strip_scheme
from llmwatts.errors import InvalidArgument
from llmwatts.loadgen.config import LoadConfig
from llmwatts.study.plan import check_plan

GOOD = {
    "gpu-host:50051": "gpu-host:50051",
    "grpc://gpu-host:50051": "gpu-host:50051",
    "grpc://gpu-host:50051/": "gpu-host:50051",
    "  grpc://gpu-host:50051/ \n": "gpu-host:50051",
    "GRPC://gpu-host:50051": "gpu-host:50051",
    "https://10.0.0.7:443//": "10.0.0.7:443",
    "\t127.0.0.1:1": "127.0.0.1:1",
    "[::1]:50051": "[::1]:50051",
    "grpc://[::1]:50051/": "[::1]:50051",
    "localhost:65535": "localhost:65535",
}
BAD = ["gpu-host", "gpu-host:", ":50051", "[]:50051", "gpu-host:0", "gpu-host:65536", "gpu-host:99999",
       "gpu-host:-1", "gpu-host:port", "gpu-host:５０", "gpu host:50051", "grpc://", "grpc://:1", "[::1]",
       "h" * (MAX_TARGET_CHARS + 1) + ":1"]


def locust_host(text: str) -> LoadConfig:
    """The Locust door: the host field (--host or the web UI), as LoadSession reads it, then checked."""
    config = LoadConfig.from_options({"llm_requests": 1}, host=text)
    config.validate()
    return config


def target_flag(text: str) -> LoadConfig:
    """The --target / library door."""
    config = LoadConfig(target=text, requests=1)
    config.validate()
    return config


def study_plan(text: str) -> str:
    """A study plan's door: ``[[servers]] target``."""
    return check_plan({"servers": [{"target": text}], "load": {"requests": 2, "dataset": "mini"}}).servers[0]


@pytest.mark.parametrize("door", [locust_host, target_flag, study_plan])
@pytest.mark.parametrize("text", GOOD)
def test_every_door_gives_the_same_host_port(door, text):
    target = door(text)
    assert getattr(target, "target", target) == GOOD[text] == parse_target(text)


def test_strip_scheme_takes_off_one_scheme_and_whitespace_only():
    assert strip_scheme("  http://h:1/ ") == "h:1"
    assert strip_scheme("grpc://grpc://h:1") == "grpc://h:1"  # one scheme; parse_target then refuses it
    assert strip_scheme("[::1]:7") == "[::1]:7"


@pytest.mark.parametrize("door", [locust_host, target_flag, study_plan, "pull"])
@pytest.mark.parametrize("text", BAD)
def test_every_door_refuses_a_bad_target_in_one_short_line(door, text, tmp_path):
    with pytest.raises(InvalidArgument, match="(--target|server target|--server) (wants )?HOST:PORT") as refused:
        if door == "pull":  # refused before any connection is tried
            pull_records(text, tmp_path / "mirror.db")
        else:
            door(text)
    message = str(refused.value)
    assert "\n" not in message and len(message) < 250


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_TARGET_CHARS * 2))
@example("\U0001b2fc" * 60)
def test_any_text_is_a_target_or_one_readable_error(text):
    """Whatever is typed, the parser answers HOST:PORT with a port 1-65535 or one short InvalidArgument
    line; never another exception. (The example guards an echo of up to 60 characters whose repr, with a
    10-character escape each, made the line 700 characters long.)"""
    try:
        target = parse_target(text)
    except InvalidArgument as e:
        assert "\n" not in str(e) and len(str(e)) < 250
        return
    host, _, port = target.rpartition(":")
    assert host and 0 < int(port) <= 65535 and len(target) <= MAX_TARGET_CHARS
