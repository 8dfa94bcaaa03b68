"""``llmwatts serve`` as a new user meets it (issue 16 item 9): every mistake is one line, before anything
is built, and every flag says what it does."""

import socket
import subprocess
import sys

import pytest

from llmwatts.cli import build_parser, main

SERVE = ["serve", "--model", "tiny", "--device", "cpu", "--power-backend", "simulated"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_a_port_outside_0_to_65535_is_refused(tmp_path, capsys, port):
    """Guards: `serve --port 99999` served on 34463 (gRPC wrapped the number)."""
    assert main([*SERVE, "--port", port, "--db", str(tmp_path / "s.db")]) == 2
    assert "--port must be between 0 and 65535" in one_line_error(capsys)


def test_a_db_in_a_missing_folder_is_one_line(tmp_path, capsys):
    """Guards: `serve --db /nonexistent/dir/s.db` ended in a traceback after the model had loaded."""
    assert main([*SERVE, "--port", "0", "--db", str(tmp_path / "nonexistent" / "s.db")]) == 2
    assert f"the folder {tmp_path / 'nonexistent'} does not exist" in one_line_error(capsys)


def test_a_mistyped_preset_is_refused_at_once_without_the_hub(tmp_path, capsys, monkeypatch):
    """Guards: `--model llama-3b` spent ~25 s on hub retries (each warning twice) before its error."""
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("a mistyped preset must not reach the hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    assert main(["serve", "--model", "llama-3b", "--port", "0", "--db", str(tmp_path / "s.db")]) == 2
    err = one_line_error(capsys)
    assert "model 'llama-3b' is neither a preset" in err and "did you mean 'llama-" in err


def test_a_taken_port_is_one_line_before_the_model_loads(tmp_path):
    """Guards: a second server on a port in use also listened (SO_REUSEPORT), then failed with gRPC's own
    log line beside ours; now one line, and before the model is built."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "llmwatts.cli", *SERVE, "--port", str(port), "--db",
                               str(tmp_path / "s.db")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"llmwatts serve: error: port {port} on 127.0.0.1 is already in use (another llmwatts serve?): stop it, "
        f"or pick another with --port (0 picks a free one)"]
    assert not (tmp_path / "s.db").exists()


def serve_parser():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["serve"]


def test_every_serve_flag_has_help():
    """Guards: --max-batch-size, --max-new-tokens-limit, --default-max-new-tokens, --queue-size, --tls-cert,
    --tls-key and --default-lease-s had no help text."""
    bare = [a.option_strings[0] for a in serve_parser()._actions if a.option_strings and not a.help]
    assert bare == []


def test_sim_profile_lists_and_checks_the_profiles(tmp_path, capsys):
    """Guards: `--sim-profile` named no profile, and a wrong one failed only after the model loaded."""
    from llmwatts.server.gpu import SIM_PROFILES

    text = serve_parser().format_help()
    assert all(name in text for name in SIM_PROFILES)
    with pytest.raises(SystemExit):
        main([*SERVE, "--sim-profile", "a100", "--port", "0", "--db", str(tmp_path / "s.db")])
    assert "invalid choice: 'a100'" in capsys.readouterr().err
