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


@pytest.mark.parametrize("v2,v1,word", [(0.45, 0.2, "the collapse the paper reports"), (0.29, 0.43, "V1 not lower"),
                                        (0.448, 0.433, "within 0.05 of each other: no collapse")])
def test_diagnose_finding_compares_v1_with_v2(v2, v1, word):
    res = {"diagnose": {"models": [{"name": "fcmae_grn", "mean_distance": v2},
                                   {"name": "fcmae_v1", "mean_distance": v1}]}}
    cfg = {"pretrain": {"overrides": {"model.name": "convnextv2_atto"},
                        "arms": {"fcmae_grn": {}, "fcmae_v1": {"model.name": "convnext_atto"}}}}
    lines = report._diagnose_findings(cfg, res)
    assert len(lines) == 2 and word in lines[-1] and f"{v1:.4f} vs `fcmae_grn` {v2:.4f}" in lines[-1]


def test_recorded_results_fill_only_the_missing_stages():
    new = {"probe": {"fcmae_grn": None, "fcmae_v1": {"runs": [1]}}, "finetune": {"fcmae_v1": {"1pct": [{"top1": 80}]}},
           "pretrain": {"fcmae_grn": {"complete": False}, "fcmae_v1": {"complete": True}}, "devices": {"a": "cpu"},
           "diagnose": {"models": [{"name": "fcmae_v1"}]}, "evaluate_check": None}
    old = {"probe": {"fcmae_grn": {"runs": [0]}, "fcmae_v1": {"runs": [9]}},
           "finetune": {"fcmae_grn": {"1pct": [{"top1": 82}]}, "fcmae_v1": {"1pct": [{"top1": 1}]}},
           "pretrain": {"fcmae_grn": {"complete": True}}, "devices": {"b": "cuda"},
           "diagnose": {"models": [{"name": "fcmae_v1", "old": 1}, {"name": "fcmae_grn"}]},
           "evaluate_check": {"top1": 90}}
    res = report.merge_recorded(new, old)
    assert res["probe"] == {"fcmae_grn": {"runs": [0]}, "fcmae_v1": {"runs": [1]}}
    assert res["finetune"] == {"fcmae_v1": {"1pct": [{"top1": 80}]}, "fcmae_grn": {"1pct": [{"top1": 82}]}}
    assert res["pretrain"]["fcmae_grn"] == {"complete": True} and res["devices"] == {"a": "cpu", "b": "cuda"}
    assert res["diagnose"]["models"] == [{"name": "fcmae_v1"}, {"name": "fcmae_grn", "recorded": True}]
    assert res["recorded"] == ["probe_fcmae_grn", "pretrain_fcmae_grn", "finetune_fcmae_grn_1pct",
                               "diagnose fcmae_grn", "evaluate_check"]
