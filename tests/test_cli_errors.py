"""Bad input through `dpokit train` (and `dpokit experiment`): one line on stderr naming file, row and problem;
exit 2; no traceback."""

import json
import os
import subprocess
import sys

import pytest

from dpokit.cli import build_parser, main

GOOD = {"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5."}


def write_config(tmp_path, model_dir, data, **extra):
    cfg = {"model": str(model_dir), "train_data": str(data), "output_dir": str(tmp_path / "out"), **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


def write_jsonl(tmp_path, *lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_cli(capsys, *argv):
    """(exit status, the error line, all of stderr)."""
    status = main(["train", *map(str, argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return status, (lines[-1] if lines else ""), err


def assert_one_error_line(status, line, err, *parts):
    assert status == 2
    assert "Traceback" not in err
    assert line.startswith("dpokit: error: ")
    assert err.count("dpokit: error") == 1  # one message, on the last line
    for part in parts:
        assert part in line, (part, line)


DATA_CASES = {
    "bad JSON line": ([GOOD, '{"prompt": "p", "chosen": " a",'], 2, "not valid JSON"),
    "missing field": ([GOOD, GOOD, {"prompt": "p", "chosen": " a"}], 3, "missing field 'rejected'"),
    "empty field": ([{**GOOD, "chosen": ""}], 1, "field 'chosen' is empty"),
    "wrong type": ([GOOD, {**GOOD, "rejected": 5}], 2, "field 'rejected' must be a string or a list"),
    "wrong weight type": ([GOOD, {**GOOD, "weight": "heavy"}], 2, "field 'weight' must be a finite number, got 'heavy'"),
    "chosen is rejected": ([GOOD, {**GOOD, "rejected": GOOD["chosen"]}], 2, "chosen and rejected are identical"),
    "not an object": ([GOOD, "[1, 2, 3]"], 2, "expected a JSON object, got an array"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_row(case, tmp_path, tiny_model_dir, capsys):
    lines, row, problem = DATA_CASES[case]
    data = write_jsonl(tmp_path, *lines)
    status, line, err = run_cli(capsys, write_config(tmp_path, tiny_model_dir, data))
    assert_one_error_line(status, line, err, f"{data}, row {row}: ", problem, "on_bad_row=skip")


def test_prompt_with_no_room_for_a_completion(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path, GOOD)
    status, line, err = run_cli(capsys, write_config(tmp_path, tiny_model_dir, data), "max_length=3",
                                "max_prompt_length=null")
    assert_one_error_line(status, line, err, f"{data}, row 1: ", "leaving no room for a completion within max_length=3")


def test_every_row_bad_under_the_skip_policy(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path, {**GOOD, "rejected": GOOD["chosen"]}, "{oops")
    status, line, err = run_cli(capsys, write_config(tmp_path, tiny_model_dir, data, on_bad_row="skip"))
    assert_one_error_line(status, line, err, f"{data}: all 2 rows are bad", "chosen and rejected are identical",
                          "not valid JSON")


def test_bad_eval_data_is_named_too(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path, GOOD)
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "prompt": "  "}) + "\n")
    status, line, err = run_cli(capsys, write_config(tmp_path, tiny_model_dir, train, eval_data=str(bad)))
    assert_one_error_line(status, line, err, f"{bad}, row 2: field 'prompt' is empty")


def test_missing_data_file(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "nope.jsonl"
    status, line, err = run_cli(capsys, write_config(tmp_path, tiny_model_dir, missing))
    assert_one_error_line(status, line, err, f"{missing}: no such file or folder")


def test_folder_that_is_not_a_dataset(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("not data")
    status, line, err = run_cli(capsys, write_config(tmp_path, tiny_model_dir, folder))
    assert_one_error_line(status, line, err, f"{folder}: a folder, but not one written by Dataset.save_to_disk")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file, so no permission error")
def test_unreadable_data_file(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path, GOOD)
    data.chmod(0)
    try:
        status, line, err = run_cli(capsys, write_config(tmp_path, tiny_model_dir, data))
    finally:
        data.chmod(0o644)
    assert_one_error_line(status, line, err, f"{data}: cannot read file", "ermission denied")


def test_bad_config_yaml(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: m\n  train_data: [\n")
    status, line, err = run_cli(capsys, cfg)
    assert_one_error_line(status, line, err, f"{cfg}: not valid YAML at line 2, column 13")


def test_unknown_config_key(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path, GOOD), betta=0.2)
    status, line, err = run_cli(capsys, cfg)
    assert_one_error_line(status, line, err, "unknown config key(s): betta")


def test_bad_override_syntax(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path, GOOD))
    status, line, err = run_cli(capsys, cfg, "beta")
    assert_one_error_line(status, line, err, "override 'beta' is not of the form key=value")
    status, line, err = run_cli(capsys, cfg, "on_bad_row=sometimes")
    assert_one_error_line(status, line, err, "on_bad_row must be 'error' or 'skip', got 'sometimes'")


def test_exit_status_from_a_real_process(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path, GOOD, GOOD, GOOD, '{"prompt": "p" "chosen": " a"}')
    cfg = write_config(tmp_path, tiny_model_dir, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpokit.cli", "train", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith(f"dpokit: error: {data}, row 4: not valid JSON"), proc.stderr
    assert proc.stderr.count("dpokit: error") == 1
    assert proc.stdout == ""


@pytest.mark.parametrize("argv, owner", [(["secalign", "--data", "x.jsonl"], "frontier"),
                                         (["frontier", "--prompt-format", "ise"], "hierarchy"),
                                         (["hierarchy", "--task=vader"], "frontier")])
def test_an_experiment_refuses_another_experiments_flag_before_running(tmp_path, capsys, argv, owner):
    status = main(["experiment", *argv, "--out", str(tmp_path / "out")])
    line, err = capsys.readouterr().err.strip(), argv[1].split("=")[0]
    assert_one_error_line(status, line, line, f"`experiment {argv[0]}` does not take",
                          f"{err} belongs to `experiment {owner}`")
    assert not (tmp_path / "out").exists()


def test_each_experiment_has_its_own_flags_and_output_dir():
    for name in ("frontier", "secalign", "hierarchy"):
        args = build_parser().parse_args(["experiment", name, "--quick", "--seed", "3"])
        assert args.out == f"runs/{name}" and args.quick and args.seed == 3 and callable(args.experiment_run)
    assert build_parser().parse_args(["experiment", "hierarchy", "--prompt-format", "ise"]).prompt_format == "ise"
    assert not hasattr(build_parser().parse_args(["experiment", "secalign"]), "task")
