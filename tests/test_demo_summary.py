from pathlib import Path

from difflens.demo import _first_table, _readable_summary


def test_readable_summary_shows_each_stage_table(tmp_path: Path):
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "interpret").mkdir()
    (tmp_path / "evaluate" / "eval.md").write_text("# Eval\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| later | table |\n")
    (tmp_path / "interpret" / "comparison.md").write_text("| source | mean |\n|---|---|\n| topk | 0.6 |\n")
    summary = {"generate": {"prompt_adherence (classifier)": {"color": 1.0, "object": 0.5}},
               "intervene": {"table": "x"}, "seconds": {"total": 3.0}}
    text = _readable_summary(tmp_path, summary)
    assert "| 1 | 2 |" in text and "later" not in text  # only the first table of a report
    assert "| topk | 0.6 |" in text
    assert "color 100%, object 50%" in text and "interventions where the concept is decided" in text
    assert "(missing:" in text  # the intervention report was never written: said, not crashed
    assert _first_table(tmp_path / "nope.md").startswith("(missing:")
