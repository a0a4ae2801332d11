"""`python -m ragcomp.bench.prune_gpu`: its --profile ranges and its offline tiktoken folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ragcomp.bench import prune_gpu

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_tiktoken_folder_is_checked_and_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    with pytest.raises(SystemExit, match=prune_gpu.CL100K_FILE):
        prune_gpu._use_tiktoken_cache(str(tmp_path))
    assert "TIKTOKEN_CACHE_DIR" not in os.environ
    (tmp_path / prune_gpu.CL100K_FILE).write_bytes(b"")
    prune_gpu._use_tiktoken_cache(str(tmp_path))
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path.resolve())


@pytest.mark.skipif(not (DATA / "qa_dev.jsonl").exists(), reason="needs ../shared/data")
def test_profile_prints_every_range_once_per_question(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    code = prune_gpu.main(["--small", "--device", "cpu", "--questions", "2", "--passages", "3",
                           "--words", "60", "--paths", "fast", "--skip-llmlingua", "--profile", "2",
                           "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("tokenize", "windows", "batch_arrays", "forward", "d2h", "sentences", "wait",
                 "sentence_means", "select"):
        row = re.search(rf"\| provence\.{name} +\| ([\d.]+) +\| ([\d.]+) ", out)
        assert row is not None, name
        assert float(row.group(1)) == 1.0 and float(row.group(2)) > 0  # one call per question, timed
    # The prepared row next to the cold ones, and it hits: every timed passage was prepared ahead.
    rows = {r["compressor"]: r for r in json.loads(report.read_text())["latency"]}
    assert rows["ragcomp provence fast (float32)"]["cache_hits"] == 0.0
    assert rows["ragcomp provence fast (float32) corpus prepared"]["cache_hits"] == 1.0
    # 60-word passages give windows far under 256 tokens: every question is on the narrow side.
    cold = rows["ragcomp provence fast (float32)"]
    assert cold["wide_share"] == 0.0 and cold["p50_ms_wide"] is None
    assert cold["p50_ms_narrow"] == cold["p50_ms"]


def test_width_split_gives_the_p50_on_each_side_of_the_wide_step() -> None:
    times = [0.010, 0.012, 0.015, 0.016, 0.011]
    widths = [240, 256, 272, 304, 224]
    split = prune_gpu.width_split(times, widths)
    assert split == {"wide_share": 0.4, "p50_ms_narrow": 11.0, "p50_ms_wide": 15.5}
    assert prune_gpu.width_split(times, widths, limit=400)["p50_ms_wide"] is None
    with pytest.raises(ValueError, match="5 times for 2 widths"):
        prune_gpu.width_split(times, widths[:2])
