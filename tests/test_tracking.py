"""metrics.jsonl (and W&B, and the report, which read the same rows) across a resume."""

import json
from pathlib import Path

from wandb_records import history

from spin_ray.config import load_config
from spin_ray.driver.prepare import prepare
from spin_ray.loop.coordinator import Coordinator
from spin_ray.report import load_run
from spin_ray.tracking import Tracker, read_metrics

ROOT = Path(__file__).resolve().parent.parent


def rows(out: Path) -> list[tuple[int, float]]:
    """(iteration, eval/accuracy) of each evaluation row: the start model's and the iterations'."""
    return [(x["iteration"], x["eval/accuracy"]) for x in read_metrics(out) if "eval/accuracy" in x]


def test_a_resume_logs_the_row_of_the_iteration_it_resumes_from_once(tmp_path):
    """DONE(2) is written before p_2's row, which is logged beside iteration 3. A job stopped in
    between resumes at 3 and evaluates p_2 again: its row is logged then (metrics, W&B, report).
    A row that is there is not logged twice, the start model's neither."""
    out = tmp_path / "run"
    overrides = [f"run.output_dir={out}", "data.max_examples=8", "run.wandb_mode=offline"]
    cfg = load_config(ROOT / "configs" / "toy.yaml", overrides)
    coordinator = Coordinator(cfg, prepare(cfg))
    coordinator.generating.set()  # no pairs to wait for
    before = [
        {"step": 0, "iteration": 0, "eval/accuracy": 0.1},
        {"step": 4, "iteration": 1, "train/loss": 0.69},
        {"step": 4, "iteration": 1, "global_step": 4, "train/loss": 0.69, "eval/accuracy": 0.2},
        {"step": 8, "iteration": 2, "train/loss": 0.68},  # then DONE(2), and the job stopped
        {"step": 10, "iteration": 3, "train/loss": 0.67},  # iteration 3, unfinished: dropped
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in before))
    model_dir = str(out / "iter_2" / "model")

    def evaluate(t: int, path: str) -> dict[str, float]:
        assert path == model_dir
        return {"eval/accuracy": 0.3}

    for _ in range(2):  # the second resume finds the row
        coordinator.tracker = Tracker(cfg, out, resume_from=3)
        row = coordinator._start_row(2, evaluate, model_dir, 8)
        coordinator.tracker.finish()
        assert rows(out) == [(0, 0.1), (1, 0.2), (2, 0.3)]
        assert row == {"iteration": 2, "global_step": 8, "eval/accuracy": 0.3}
    assert read_metrics(out)[-1] == {"step": 8} | row
    assert list(load_run(out).iterations["global_step"].dropna()) == [4, 8]
    assert [(r["iteration"], r["eval/accuracy"]) for r in history(out) if "global_step" in r] == [(2, 0.3)]
    # The start model's row, on a resume before iteration 1 was done.
    coordinator.tracker = Tracker(cfg, out, resume_from=1)
    coordinator._start_row(0, lambda t, path: {"eval/accuracy": 0.1}, "p_0", 0)
    coordinator.tracker.finish()
    assert rows(out) == [(0, 0.1)]
