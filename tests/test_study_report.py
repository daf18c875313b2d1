"""The Fashion-MNIST study's write-up: statements read off the numbers (examples/fashion_mnist/report.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"))
report = pytest.importorskip("report")


def _rows(segments):
    """metrics.jsonl rows: per segment, (steps, seconds per 25 steps, knn seconds at every 500th step)."""
    rows = []
    for start, stop, sec, knn in segments:
        t = 0.0
        for step in range(start + 25, stop + 1, 25):
            t += sec
            rows.append({"step": step, "img_per_s": 25 * 64 / sec, "time_s": t})
            if step % 500 == 0:
                t += knn
                rows.append({"step": step, "knn_top1": 70.0, "knn_seconds": knn})
    return rows


def test_monitor_overhead_sums_segments_and_gives_a_stall_proof_steady_state():
    # one run resumed at step 1000: 2 segments; 4 evaluations of 2 s, 25 steps take 5 s
    mon = report.monitor_overhead(_rows([(0, 1000, 5.0, 2.0), (1000, 2000, 5.0, 2.0)]), 64, 500)
    assert mon["evaluations"] == 4 and mon["monitor_s"] == pytest.approx(8.0)
    # wall time = the last logged time of each segment (a segment's last evaluation comes after its last log line)
    assert mon["wall_s"] == pytest.approx(2 * (40 * 5.0 + 2.0))
    assert mon["percent"] == pytest.approx(100 * 8.0 / 404.0)
    assert mon["steady_percent"] == pytest.approx(100 * 2.0 / (2.0 + 100.0))
    # one stalled evaluation moves the measured share but not the steady state
    rows = _rows([(0, 2000, 5.0, 2.0)])
    next(r for r in rows if r.get("knn_seconds"))["knn_seconds"] = 60.0
    assert report.monitor_overhead(rows, 64, 500)["steady_percent"] == pytest.approx(100 * 2.0 / 102.0)
    assert report.monitor_overhead([], 64, 500) is None


@pytest.mark.parametrize("grn,nogrn,word", [(0.5, 0.3, "the direction the paper reports"),
                                            (0.3, 0.5, "does not reproduce")])
def test_diagnose_finding_compares_grn_with_no_grn(grn, nogrn, word):
    res = {"diagnose": {"models": [{"name": "fcmae_grn", "mean_distance": grn},
                                   {"name": "fcmae_nogrn", "mean_distance": nogrn},
                                   {"name": "random init", "mean_distance": 0.9}]}}
    cfg = {"pretrain": {"arms": {"fcmae_grn": {"model.use_grn": True}, "fcmae_nogrn": {"model.use_grn": False}}}}
    lines = report._diagnose_findings(cfg, res)
    assert word in lines[-1] and f"{grn:.4f} vs {nogrn:.4f}" in lines[-1]
    assert report._diagnose_findings(cfg, {"diagnose": None}) == []
