"""`prune_gpu --paths`: the FlexAttention rows (flex, flex-graphs), unknown names refused, and a path
that fails (e.g. no compiler for flex) reported as a row while the other paths are still timed."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ragcomp.accel import deberta_flex
from ragcomp.bench import prune_gpu

SMALL = ["--small", "--device", "cpu", "--questions", "2", "--passages", "3", "--words", "40",
         "--skip-llmlingua"]


def test_unknown_path_is_refused_with_the_known_names() -> None:
    with pytest.raises(SystemExit, match=r"unknown flash .*known: hf, fast, graphs, cbias-graphs, flex"):
        prune_gpu.main([*SMALL, "--paths", "fast,flash"])


def test_a_failing_path_is_a_row_and_the_others_still_run(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def no_compiler(*args: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(deberta_flex, "relative_flex_attention", no_compiler)
    assert prune_gpu.main([*SMALL, "--paths", "flex,fast,flex-graphs", "--profile", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if "| ragcomp provence" in line}
    assert "ragcomp provence flex (float32) FAILED: RuntimeError: no compiler here" in rows
    assert "ragcomp provence fast (float32)" in rows  # timed after the failure
    assert not any("flex-graphs" in name for name in rows)  # graph paths are CUDA only
    assert "Profile of path fast" in out and "Profile of path flex" not in out
