"""Prompt sources: template, sampling, file lookup, the embedded mini set."""

import json
from pathlib import Path

import pytest

from llmwatts.errors import InvalidArgument, NotFound
from llmwatts.loadgen import prompts
from llmwatts.loadgen.prompts import MINI_DATASET_NAME, alpaca_prompt, load_prompts, sample

SHARED_DATA = Path("/work/shared/data")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_alpaca_template_without_input_is_exact():
    assert alpaca_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )


def test_alpaca_template_with_input_is_exact():
    assert alpaca_prompt("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nBonjour\n\n### Response:\n"
    )


def test_sampling_is_deterministic_and_without_replacement_when_enough_records():
    records = [f"p{i}" for i in range(100)]
    a, b = sample(records, 40, seed=7), sample(records, 40, seed=7)
    assert a == b
    assert len(set(a)) == 40
    assert sample(records, 40, seed=8) != a


def test_sampling_with_replacement_when_more_prompts_than_records():
    records = ["x", "y", "z"]
    a = sample(records, 10, seed=1)
    assert a == sample(records, 10, seed=1) and len(a) == 10 and set(a) <= set(records)


def test_sampling_refuses_nonpositive_counts():
    with pytest.raises(InvalidArgument):
        sample(["x"], 0, seed=0)


def test_alpaca_jsonl_and_json_array_found_in_data_dir(tmp_path):
    records = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Wave.", "input": ""}]
    write_jsonl(tmp_path / "alpaca_5k.jsonl", records)
    got = load_prompts("alpaca", num_prompts=2, seed=0, data_dir=tmp_path)
    assert sorted(got.prompts) == sorted([alpaca_prompt("Add.", "2 and 3"), alpaca_prompt("Wave.")])
    assert got.name == "alpaca" and got.source == str(tmp_path / "alpaca_5k.jsonl")

    other = tmp_path / "other"
    other.mkdir()
    (other / "alpaca_data.json").write_text(json.dumps(records), encoding="utf-8")
    assert sorted(load_prompts("alpaca", num_prompts=2, data_dir=other).prompts) == sorted(got.prompts)


def test_data_dir_env_is_searched(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "gsm8k_train.jsonl", [{"question": "What is 1+1?", "answer": "#### 2"}])
    monkeypatch.setenv("LLMWATTS_DATA_DIR", str(tmp_path))
    got = load_prompts("gsm8k", split="train", num_prompts=3)
    assert got.prompts == ("What is 1+1?",) * 3 and got.name == "gsm8k-train"


def test_missing_file_offline_names_the_file_and_folders(tmp_path):
    with pytest.raises(NotFound) as err:
        load_prompts("gsm8k", data_dir=tmp_path / "nowhere")
    message = str(err.value)
    assert "gsm8k_test.jsonl" in message and str(tmp_path / "nowhere") in message
    assert str(tmp_path / "cache" / "data") in message and "\n" not in message


def test_jsonl_field(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": "one", "id": 1}, {"text": "two", "id": 2}])
    got = load_prompts("jsonl", jsonl_path=path, field="text", num_prompts=2, seed=3)
    assert sorted(got.prompts) == ["one", "two"] and got.name == "jsonl:mine.jsonl:text"
    with pytest.raises(InvalidArgument, match="no field 'prompt'"):
        load_prompts("jsonl", jsonl_path=path, field="prompt")
    with pytest.raises(NotFound, match="absent.jsonl"):
        load_prompts("jsonl", jsonl_path=tmp_path / "absent.jsonl", field="text")


def test_mini_set_is_embedded_varied_and_labelled():
    everything = prompts._mini_records()
    instructions = [p for p in everything if p.startswith("Below is an instruction")]
    questions = [p for p in everything if not p.startswith("Below is an instruction")]
    assert len(instructions) >= 64 and len(questions) >= 32
    assert len(set(everything)) == len(everything)
    got = load_prompts("mini", num_prompts=16, seed=0)
    assert got.name == MINI_DATASET_NAME and got.source == "embedded" and len(got) == 16


def test_batches_walk_the_sample_in_order_and_wrap():
    got = prompts.PromptSet("t", ("a", "b", "c"), "x")
    assert got.batch(0, 2) == ["a", "b"] and got.batch(1, 2) == ["c", "a"]


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_5k.jsonl").exists(), reason="real data not present")
def test_real_alpaca_and_gsm8k_sample_the_paper_size():
    alpaca = load_prompts("alpaca", data_dir=SHARED_DATA)
    assert len(alpaca) == 4096 and len(set(alpaca.prompts)) > 4000  # 5k records: without replacement
    assert all(p.startswith("Below is an instruction") and p.endswith("### Response:\n") for p in alpaca.prompts)
    gsm8k = load_prompts("gsm8k", data_dir=SHARED_DATA)  # 1319 test questions: with replacement
    assert len(gsm8k) == 4096 and len(set(gsm8k.prompts)) <= 1319
