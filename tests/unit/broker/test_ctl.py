"""broker.ctl's output and argument handling, without a broker."""

from __future__ import annotations

import pytest

from broker.ctl import _parser, format_status, main

STATUS = {
    "broker": {"pid": 42, "uptime_s": 61.0, "requests": 10, "batches": 4, "rows": 10,
               "swap_policy": "availability_preserving"},
    "models": [{
        "name": "m", "base_path": "/models/m",
        "version_policy": {"kind": "specific", "num_versions": 1, "versions": [1, 2]},
        "on_disk": [1, 2], "aspired": [1, 2],
        "labels": {"stable": 1}, "pending_labels": {"canary": 2},
        "versions": [
            {"version": 1, "state": "AVAILABLE", "error": "", "draining": False, "pid": 7, "queued": 3,
             "in_flight": 2, "path": "/models/m/1"},
            {"version": 2, "state": "END", "error": "no SavedModel in /models/m/2", "draining": False,
             "pid": None, "queued": 0, "in_flight": 0, "path": "/models/m/2"},
        ],
    }, {"name": "other", "base_path": "/o", "version_policy": {"kind": "latest", "num_versions": 1, "versions": []},
        "on_disk": [], "aspired": [], "labels": {}, "pending_labels": {}, "versions": []}],
}


def test_status_reads_as_a_table() -> None:
    text = format_status(STATUS)
    assert "broker pid 42" in text and "10 requests in 4 batches" in text
    assert "policy specific 1,2" in text
    assert "labels stable=1 (waiting for their version: canary=2)" in text
    lines = text.splitlines()
    newest_first = [line.split()[0] for line in lines if line.strip().startswith(("1 ", "2 "))]
    assert newest_first == ["2", "1"]
    assert any("END" in line and "no SavedModel" in line for line in lines)
    assert any("AVAILABLE" in line and " 7 " in line for line in lines)
    assert "(no versions)" in text


def test_status_of_one_model_leaves_the_others_out() -> None:
    text = format_status(STATUS, "other")
    assert "model other" in text and "model m " not in text


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["load", "m", "not-a-number"])
    assert exited.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--json", "--timeout_s=3", "status", "m"], ["status", "m", "--json", "--timeout_s=3"],
                                  ["--timeout_s=9", "status", "--json", "m", "--timeout_s=3"]])
def test_options_go_before_or_after_the_command(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert (args.command, args.model, args.json, args.timeout_s) == ("status", "m", True, 3.0)


def test_an_option_before_the_command_stands_when_none_follows_it() -> None:
    args = _parser().parse_args(["--runtime_dir=/run/x", "load", "m", "2", "--wait"])
    assert (args.runtime_dir, args.timeout_s, args.wait) == ("/run/x", 10.0, True)
