"""The run report on synthetic run directories (no SPIN job): rendered by a real headless Chromium."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import run_notebook

from spin_ray import plots
from spin_ray.report import load_run, render, write_report

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
SECTIONS = ["training", "held-out", "pair-lengths", "pairs", "timing", "metrics"]
SPIN_KEYS = [
    "train/loss",
    "train/rewards/accuracies",
    "train/rewards/margins",
    "train/rewards/real",
    "train/rewards/generated",
    "train/logps/real",
    "train/logps/generated",
]
PHASES = {"time/generate_s": 0.5, "time/train_s": 1.0, "time/export_s": 0.25, "time/sync_s": 0.125, "time/eval_s": 0.5}
NASTY = "<script>alert('x')</script> & <b>"  # must reach the page as text, not markup


def make_run(out: Path, train_keys: list[str] = SPIN_KEYS, held_out: bool = True, finished: bool = True) -> Path:
    """Two iterations of 12 pairs and 4 logged steps each, as jobs/spin.py writes them."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": {"path": "toy"}, "spin": {"iterations": 3, "beta": 0.1}, "train": {"lr": 1e-5}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    evals = {"eval/logps/real": -1.4, "eval/accuracy": 0.5} if held_out else {}
    lines, history = ([{"step": 0, "iteration": 0, **evals}] if held_out else []), []
    step = 0
    for t in (1, 2):
        for _ in range(4):
            step += 4
            lines.append({"step": step, "iteration": t, "train/lr": 1e-5, "train/epoch": 0})
            lines[-1] |= {k: -0.01 * step + i for i, k in enumerate(train_keys)}
        row = {"iteration": t, "global_step": step, **PHASES, "time/iteration_s": 3.0 + t, "gen/tokens_per_s": 9.0}
        row |= {k: -0.01 * step + i for i, k in enumerate(train_keys)}
        row |= {k: v + 0.1 * t for k, v in evals.items()}
        lines.append({"step": step} | row)
        history.append(row)
        rows = [
            {
                "uid": f"train-{i:06d}",
                "prompt": f"<|user|>{i}+{t}= {NASTY}<|assistant|>",
                "real": str(i + t),
                "prompt_ids": [1, 2, 3],
                "real_ids": list(range(2 + i % 3)),
                "seed": i,
                "generated_ids": list(range(1 + (i + t) % 4)),
                "generated": f"{i}{t}",
                "generated_tokens": 1 + (i + t) % 4,
                "prompt_tokens": 3,
            }
            for i in range(12)
        ]
        (out / f"iter_{t}" / "pairs").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), out / f"iter_{t}" / "pairs" / "pairs.parquet")
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (out / "summary.json").write_text(json.dumps({"history": history}))
    return out


def crash_after_first_iteration(out: Path) -> None:
    """Iteration 2 generated its pairs and logged steps but died before its row, mid-line."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if not ('"global_step"' in x and '"iteration": 2' in x)]
    (out / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 36, "iter')
    (out / "summary.json").unlink()


def browse(page: Path, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The DOM after the page loaded in headless Chromium, and its <body>'s attributes (the page's own
    script counts its images and those that decoded)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: `bash scripts/setup.sh` run as root installs it")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    proc = subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:2000]
    return proc.stdout, dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def section_ids(dom: str) -> list[str]:
    return re.findall(r'<section id="([\w-]+)"', dom)


def test_finished_run_renders_every_figure(tmp_path):
    run_dir = make_run(tmp_path / "run")
    page = write_report(run_dir)
    assert page == run_dir / "report.html"
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []  # written atomically
    dom, body = browse(page, tmp_path)
    assert body["data-images"] == body["data-images-ok"] == "4", body  # training, held-out, lengths, timing
    assert section_ids(dom) == SECTIONS
    assert "finished: 2 iterations" in dom and str(run_dir) in dom
    assert 'class="absent"' not in dom
    assert dom.count("<h3>iteration") == 2 and dom.count('<table class="pairs">') == 2
    assert "&lt;script&gt;alert('x')&lt;/script&gt; &amp; &lt;b&gt;" in dom and "<script>alert" not in dom
    assert "<script src" not in page.read_text() and "<link" not in page.read_text()  # self-contained


def test_crashed_run_still_renders(tmp_path):
    run_dir = make_run(tmp_path / "run")
    crash_after_first_iteration(run_dir)
    dom, body = browse(write_report(run_dir), tmp_path)
    assert body["data-images"] == body["data-images-ok"] == "4", body
    assert section_ids(dom) == SECTIONS
    assert "in progress or stopped after iteration 1 of 3" in dom
    assert re.search(r"unfinished</th><td>iteration 2<", dom)
    assert "metrics.jsonl line 11 is not JSON" in dom
    assert dom.count("<h3>iteration") == 2  # iteration 2's pairs are shown although it never finished


def test_empty_run_says_what_is_missing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    dom, body = browse(write_report(run_dir), tmp_path)
    assert body["data-images"] == body["data-images-ok"] == "0"
    assert section_ids(dom) == SECTIONS
    assert dom.count('class="absent"') == 6
    assert "stopped before iteration 1 finished" in dom


def test_sft_arm_without_held_out_or_pairs(tmp_path):
    """An arm that logs only loss and real log-probs, no eval keys, no pair files: fewer panels, no error."""
    run_dir = make_run(tmp_path / "run", train_keys=["train/loss", "train/logps/real"], held_out=False)
    for t in (1, 2):
        shutil.rmtree(run_dir / f"iter_{t}")
    run = load_run(run_dir)
    assert [ax.get_title() for ax in plots.training_figure(run.steps, run.iterations).axes] == [
        "SPIN loss",
        "log-prob, summed over the response",
    ]
    assert plots.held_out_figure(run.iterations) is None and plots.pair_lengths_figure(run.lengths) is None
    page = render(run)
    assert page.count("<img") == 2 and "No held-out metrics" in page and "No pairs" in page


def test_phase_seconds_and_examples(tmp_path):
    run = load_run(make_run(tmp_path / "run"))
    seconds = plots.phase_seconds(run.iterations)
    assert list(seconds.columns) == [*PHASES, "other"]
    assert seconds["other"].tolist() == [4.0 - 2.375, 5.0 - 2.375]  # time/iteration_s minus the phases
    # Pairs per response length: 12 pairs of real lengths 2, 3, 4 and generated lengths 1-4.
    assert sorted(run.lengths) == [1, 2] and run.lengths[1]["real"].tolist() == [0, 0, 4, 4, 4]
    assert run.lengths[1]["generated"].tolist() == [0, 3, 3, 3, 3]
    # The same prompts in every iteration, spread over the uids.
    assert run.examples[1]["uid"].tolist() == run.examples[2]["uid"].tolist()
    assert run.examples[1]["uid"].tolist() == [f"train-{i:06d}" for i in (0, 2, 4, 7, 9)]


def test_cli_rebuilds_the_report(tmp_path):
    run_dir = make_run(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "spin_ray.report", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(run_dir / "report.html")
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()
    missing = subprocess.run([sys.executable, "-m", "spin_ray.report", str(tmp_path / "nope")], capture_output=True)
    assert missing.returncode == 2


def test_notebook_executes_on_a_crashed_run(tmp_path, monkeypatch):
    """The notebook draws with the report's code; a run without its last row must not stop it."""
    run_dir = make_run(tmp_path / "run")
    crash_after_first_iteration(run_dir)
    nb = run_notebook(run_dir)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4
