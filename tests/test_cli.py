"""The ``kvpolicy`` command line: bad input gives one ``kvpolicy: error: ...`` line (exit code 2), never a
traceback, and before any model is loaded; a closed stdout pipe exits quietly with 141."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from kvpolicy import cli
from kvpolicy.cli import build_parser, main

ALLOWED = "allowed: a ratio in (0, 1] (0.2), a percentage in (0, 100] (20%) or a token count >= 1 (512)"


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must fail before the (slow) model load: loading it fails the test."""
    def refuse(path):
        raise AssertionError(f"the model was loaded ({path!r}) although the input is bad")

    monkeypatch.setattr(cli, "_load_model", refuse)


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "chapter.txt"
    p.write_text("It is a truth universally acknowledged.\n", encoding="utf-8")
    return p


def run_args(*extra: str) -> list[str]:
    return ["run", "--policy", "snapkv", "--prompt-file", "chapter.txt", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("value, budget", [("0.2", 0.2), ("20%", 0.2), ("100%", 1.0), ("0.5 %", 0.005),
                                           ("512", 512), ("1", 1), ("1.0", 1.0)])
def test_budget_flag_accepts_ratio_percentage_and_token_count(value, budget):
    got = build_parser().parse_args(run_args("--budget", value)).budget
    assert got == pytest.approx(budget) and type(got) is type(budget)
    assert build_parser().parse_args(["demo", "--budget", value]).budget == pytest.approx(budget)


@pytest.mark.parametrize("value, problem", [("abc", "'abc' is not a number"), ("20 percent", "is not a number"),
                                            ("%", "is not a number"), ("1.5", "'1.5' is out of range"),
                                            ("150%", "is out of range"), ("0%", "is out of range"),
                                            ("0.0", "is out of range"), ("nan", "is out of range"),
                                            ("inf", "is out of range"), ("0", "a token count must be >= 1"),
                                            ("-3", "a token count must be >= 1")])
def test_bad_budget_is_a_one_line_usage_error(value, problem, capsys, no_model):
    with pytest.raises(SystemExit) as stop:
        main(run_args("--budget", value))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # argparse: the usage line, then the error
    assert last.startswith("kvpolicy run: error: argument --budget: ") and problem in last and last.endswith(ALLOWED)


def test_budget_help_documents_the_percentage(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a percentage in (0, 100] (20%)" in out


def test_missing_or_unreadable_prompt_file(tmp_path, capsys, no_model):
    assert main(["run", "--policy", "snapkv", "--prompt-file", str(tmp_path / "nowhere.txt")]) == 2
    assert one_error_line(capsys) == f"kvpolicy: error: --prompt-file {str(tmp_path / 'nowhere.txt')!r}: no such file"
    assert main(["run", "--policy", "snapkv", "--prompt-file", str(tmp_path)]) == 2
    assert one_error_line(capsys).endswith("is a directory; give a text file")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    assert main(["run", "--policy", "snapkv", "--prompt-file", str(binary)]) == 2
    assert "blob.txt': not UTF-8 text (invalid start byte at byte 0)" in one_error_line(capsys)


def test_unknown_policy_and_bad_policy_file_in_run(tmp_path, prompt, capsys, no_model):
    assert main(["run", "--policy", "snapkvv", "--prompt-file", str(prompt)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("kvpolicy: error: unknown preset 'snapkvv' - did you mean 'snapkv'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: {ratio: 1.5, sinks: 2}\nscorer: {name: snapkv, window: wide}\n")
    assert main(["run", "--policy", str(bad), "--prompt-file", str(prompt)]) == 2
    line = one_error_line(capsys)  # every problem, on one line
    assert "budget.ratio: Input should be less than or equal to 1 (got 1.5); budget.sinks: unknown field" in line
    assert main(["run", "--policy", str(tmp_path / "gone.toml"), "--prompt-file", str(prompt)]) == 2
    assert "gone.toml: no such config file" in one_error_line(capsys)


def test_model_directory_that_does_not_exist_or_holds_no_model(tmp_path, prompt, capsys):
    missing = tmp_path / "m"
    assert main(["run", "--policy", "snapkv", "--prompt-file", str(prompt), "--model", str(missing)]) == 2
    assert one_error_line(capsys) == (f"kvpolicy: error: cannot load --model {str(missing)!r}: {missing}: not a "
                                      f"directory; give a local transformers model directory")
    missing.mkdir()
    assert main(["run", "--policy", "snapkv", "--prompt-file", str(prompt), "--model", str(missing)]) == 2
    assert one_error_line(capsys).startswith(f"kvpolicy: error: cannot load --model {str(missing)!r}: ")


def test_validate_a_file_that_is_not_text(tmp_path, capsys):
    binary = tmp_path / "policy.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert main(["validate", str(binary)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "policy.yaml: not UTF-8 text (invalid start byte at byte 0)" in err


def test_a_pydantic_validation_error_is_one_line(monkeypatch, capsys):
    from kvpolicy.policy import Budget

    monkeypatch.setattr(cli, "cmd_schema", lambda args: Budget(ratio=2, sinks=1))
    assert main(["schema"]) == 2
    assert one_error_line(capsys) == ("kvpolicy: error: Budget.ratio: Input should be less than or equal to 1 "
                                      "(got 2); Budget.sinks: unknown field (got 1)")


def test_closed_stdout_pipe_exits_141_without_a_traceback():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written (`kvpolicy plugins | head -1`, late)
    try:
        proc = subprocess.run([sys.executable, "-m", "kvpolicy.cli", "plugins"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


class _ClosedPipe(io.StringIO):
    """A stdout whose reader has gone: writing fails as on a closed pipe; ``fileno`` is a scratch file."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        return self.fd


def test_broken_pipe_while_printing_a_long_output(tmp_path, monkeypatch):
    with open(tmp_path / "stdout", "w") as scratch:
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(scratch.fileno()))
        assert main(["schema"]) == 141  # the error is raised by print(), in the middle of the output


def test_demo_checks_its_policies_and_counts_before_loading_the_model(capsys, no_model):
    assert main(["demo", "--policies", "full", "snapkvv"]) == 2
    assert one_error_line(capsys).startswith("kvpolicy: error: unknown preset 'snapkvv'")
    for flag in ("--tokens", "--max-new-tokens"):
        with pytest.raises(SystemExit) as stop:
            main(["demo", flag, "0"])
        assert stop.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last == f"kvpolicy demo: error: argument {flag}: '0': allowed: an integer >= 1"


def test_trace_summary_of_a_file_that_is_not_text(tmp_path, capsys):
    binary = tmp_path / "trace.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["trace-summary", str(binary)]) == 2
    assert one_error_line(capsys).endswith("trace.jsonl: not UTF-8 text (invalid start byte at byte 0); expected a "
                                           "trace written by --trace jsonl:PATH")


def test_bench_argument_errors_go_to_stderr(capsys):
    assert main(["bench", "--contexts", "10"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "kvpolicy: error: context length 10: allowed >= 192 (4 × the copy span)\n"
