"""`report.html` in a run directory: one self-contained page (figures embedded as PNG data URIs) that shows
how a SPIN run went. It is built only from what the run left on disk, so it serves a finished, a running
and a crashed run alike, saying what is missing instead of failing.

    python -m spin_ray.report RUN_DIR
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import yaml

from spin_ray import plots
from spin_ray.rundir import RunDir, write_atomic
from spin_ray.tracking import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIG_HIGHLIGHTS = [
    "model.path",
    "data.train_path",
    "data.max_examples",
    "spin.iterations",
    "spin.beta",
    "spin.loss_type",
    "spin.mix_previous",
    "train.lr",
    "train.optimizer",
    "train.schedule",
    "train.epochs",
    "train.batch_size",
    "train.lora.r",
    "train.lora.target_modules",
    "generation.temperature",
    "generation.max_tokens",
]
PAIR_COLUMNS = {"uid", "prompt", "real", "generated", "real_ids", "generated_tokens"}
MAX_CHARS = 2000  # per text cell: a long response would bury the table


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    steps: pd.DataFrame  # one row per logged training step
    iterations: pd.DataFrame  # the start model's row (when logged), then one row per finished iteration
    lengths: dict[int, pd.DataFrame]  # iteration -> pairs per response length (row = tokens): real, generated
    examples: dict[int, pd.DataFrame]  # iteration -> a few pairs: uid, prompt, real, generated
    problems: list[str] = field(default_factory=list)  # files that were there but could not be read

    @property
    def finished(self) -> bool:
        """summary.json is written when the job ends; one left by an earlier job that this one resumed
        does not cover the iterations added since."""
        if self.summary is None:
            return False
        covered = max((h.get("iteration", -1) for h in self.summary.get("history", [])), default=-1)
        return covered >= max(self.seen_iterations(), default=-1)

    def finished_iterations(self) -> list[int]:
        return [int(t) for t in plots.trained_rows(self.iterations)["iteration"]]

    def seen_iterations(self) -> set[int]:
        """Every iteration that left a trace: metrics lines or pairs."""
        return set(self.steps["iteration"].astype(int)) | set(self.finished_iterations()) | set(self.lengths)

    def status(self) -> str:
        done = self.finished_iterations()
        if self.finished:
            return f"finished: {len(done)} iterations"
        total = _lookup(self.config, "spin.iterations")
        of = f" of {total}" if total else ""
        if not done:
            return f"in progress or stopped before iteration 1{of} finished"
        return f"in progress or stopped after iteration {done[-1]}{of}"


def load_run(run_dir: str | Path, n_examples: int = 5) -> Run:
    path = Path(run_dir)
    problems: list[str] = []
    lines = _read_metrics(path, problems)
    # Step lines carry train/* keys, iteration rows a global step, the start model's row neither.
    is_step = ["global_step" not in x and any(k.startswith("train/") for k in x) for x in lines]
    steps = _table([x for x, step in zip(lines, is_step, strict=True) if step], "step")
    iterations = _table([x for x, step in zip(lines, is_step, strict=True) if not step], "iteration")
    lengths, examples = _read_pairs(path, n_examples, problems)
    return Run(
        path=path,
        config=_read_yaml(RunDir(path).config, problems),
        summary=_read_json(RunDir(path).summary, problems),
        steps=steps,
        iterations=iterations,
        lengths=lengths,
        examples=examples,
        problems=problems,
    )


def write_report(run_dir: str | Path) -> Path:
    """Writes `run_dir/report.html` (atomically: a reader never sees half a page) and returns its path."""
    run = load_run(run_dir)
    out = RunDir(run.path).report
    write_atomic(out, render(run))
    return out


def render(run: Run) -> str:
    sections = [
        section(
            "training",
            "Training",
            "Per logged step (thin) and iteration means (thick). Rewards are beta * (log p(y|x) - log p_t(y|x)); "
            "the margin is real minus generated, the accuracy the share of pairs with a positive margin. "
            "A pair whose y' equals y has margin 0 and no gradient: the distinct-pair figures leave those out.",
            figure(plots.training_figure(run.steps, run.iterations), "No training metrics logged yet."),
        ),
        section(
            "held-out",
            "Held-out metrics",
            "After each iteration; the first point is the start model p_0.",
            figure(plots.held_out_figure(run.iterations), "No held-out metrics (eval/*) logged yet."),
        ),
        section(
            "pair-lengths",
            "Pair lengths",
            "Real and generated response lengths in tokens; iteration t's answers come from p_(t-1).",
            figure(plots.pair_lengths_figure(run.lengths), "No pairs (iter_<t>/pairs) on disk yet."),
        ),
        section(
            "pairs",
            "A few pairs",
            "The same prompts in every iteration where they can be: prompt, real answer y, generated answer y'.",
            "".join(_pairs_table(t, df) for t, df in sorted(run.examples.items()))
            or _absent("No pairs (iter_<t>/pairs) on disk yet."),
        ),
        section(
            "timing",
            "Time per phase",
            "Seconds of each finished iteration; 'other' is its time that no phase accounts for.",
            figure(plots.timing_figure(run.iterations), "No finished iteration with timings yet."),
        ),
        section("metrics", "All iteration metrics", "", _metrics_table(run.iterations)),
    ]
    return PAGE.format(title=html.escape(f"SPIN run {run.path.name}"), header=_header(run), body="".join(sections))


def _header(run: Run) -> str:
    rows = [("run directory", str(run.path.resolve())), ("status", run.status())]
    pending = sorted(run.seen_iterations() - set(run.finished_iterations()))
    if pending and not run.finished:
        rows.append(("unfinished", ", ".join(f"iteration {t}" for t in pending)))
    rows += [(key, _lookup(run.config, key)) for key in CONFIG_HIGHLIGHTS if _lookup(run.config, key) is not None]
    rows.append(("report written", time.strftime("%Y-%m-%d %H:%M:%S %Z")))
    rows += [("problem", p) for p in run.problems]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class=header>{cells}</table>"


def section(anchor: str, title: str, text: str, content: str) -> str:
    note = f"<p>{html.escape(text)}</p>" if text else ""
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{note}{content}</section>'


def figure(fig: Figure | None, absent: str) -> str:
    if fig is None:
        return _absent(absent)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _absent(text: str) -> str:
    return f"<p class=absent>{html.escape(text)}</p>"


def _pairs_table(t: int, df: pd.DataFrame) -> str:
    columns = ["uid", "prompt", "real", "generated"]
    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td><pre>{html.escape(_clip(str(row[c])))}</pre></td>" for c in columns) + "</tr>"
        for _, row in df.iterrows()
    )
    return f"<h3>iteration {t}</h3><table class=pairs><tr>{head}</tr>{body}</table>"


def _metrics_table(iterations: pd.DataFrame) -> str:
    if iterations.empty:
        return _absent("No metrics rows yet.")
    table = iterations.drop(columns=["step", "iteration"], errors="ignore")
    table = table.set_axis(pd.Index(plots.iteration_labels(iterations), name="iteration")).T
    return table.to_html(float_format=lambda v: f"{v:.5g}", na_rep="", border=0)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f" … [{len(text) - MAX_CHARS} more characters]"


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _read_metrics(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not RunDir(path).metrics.exists():
        return []
    lines = read_metrics(path, problems)
    return [x for x in lines if isinstance(x, dict) and "iteration" in x and "step" in x]  # as Tracker writes


def _table(lines: list[dict[str, Any]], key: str) -> pd.DataFrame:
    """Lines sorted by `key`, the last of each kept: a trainer restarted within an iteration logs its steps again."""
    table = pd.DataFrame(lines) if lines else pd.DataFrame(columns=["step", "iteration"])
    return table.drop_duplicates(key, keep="last").sort_values(key).reset_index(drop=True)


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError as e:
        problems.append(f"config.yaml: {e}")
        return {}
    return config if isinstance(config, dict) else {}


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError as e:
        problems.append(f"{path.name}: {e}")
        return None
    return data if isinstance(data, dict) else None


def _read_pairs(
    path: Path, n_examples: int, problems: list[str]
) -> tuple[dict[int, pd.DataFrame], dict[int, pd.DataFrame]]:
    """Per iteration: how many pairs have each real and generated length (counted file by file, so
    a large run is never read whole), and the same few prompts' pairs in each iteration (those
    picked in the first one, where present), so a reader can follow one answer across iterations."""
    lengths: dict[int, pd.DataFrame] = {}
    examples: dict[int, pd.DataFrame] = {}
    picked: list[str] = []
    run = RunDir(path)
    for t in run.iterations():
        pairs_dir = run.pairs(t)
        if not pairs_dir.exists():
            continue
        try:
            data = ds.dataset(pairs_dir, format="parquet")
            names = set(data.schema.names)
            missing = PAIR_COLUMNS - names
            if missing:
                problems.append(f"{pairs_dir.relative_to(path)}: no column {', '.join(sorted(missing))}")
                continue
            real, generated = np.zeros(0, np.int64), np.zeros(0, np.int64)
            for batch in data.to_batches(columns=["real_ids", "generated_tokens"]):
                real = _counted(real, pc.list_value_length(batch["real_ids"]).to_numpy(zero_copy_only=False))
                generated = _counted(generated, batch["generated_tokens"].to_numpy(zero_copy_only=False))
            if not real.sum():
                problems.append(f"{pairs_dir.relative_to(path)}: no pairs")
                continue
            real, generated = _same_width(real, generated)
            lengths[t] = pd.DataFrame({"real": real, "generated": generated})
            uids = data.to_table(columns=["uid"])["uid"].combine_chunks()
            found = pc.is_in(pa.array(picked, pa.string()), value_set=uids).to_pylist()
            chosen = [u for u, ok in zip(picked, found, strict=True) if ok] or _spread(uids, n_examples)
            picked = picked or chosen
            rows = data.to_table(columns=["uid", "prompt", "real", "generated"], filter=pc.field("uid").isin(chosen))
            examples[t] = rows.to_pandas().drop_duplicates("uid").set_index("uid").loc[chosen].reset_index()
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{pairs_dir.relative_to(path)}: {e}")
    return lengths, examples


def _counted(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`counts` (pairs per length) plus `values`' lengths."""
    counts, more = _same_width(counts, np.bincount(values))
    return counts + more


def _same_width(*counts: np.ndarray) -> list[np.ndarray]:
    """Counts per length, padded with zeros to the longest."""
    width = max(len(c) for c in counts)
    return [np.pad(c, (0, width - len(c))) for c in counts]


def _spread(uids: pa.Array, n: int) -> list[str]:
    """n uids spread evenly over their sorted order, so the examples are not all the first few."""
    ordered = uids.take(pc.sort_indices(uids))
    return [ordered[i * len(ordered) // n].as_py() for i in range(min(n, len(ordered)))]


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }}
table.header th {{ background: #f4f4f4; }}
table.pairs td {{ max-width: 40em; }}
pre {{ white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.95em; }}
img {{ max-width: 100%; }}
.absent {{ color: #a60; font-style: italic; }}
section {{ margin-top: 2em; }}
</style>
<script>
// Lets a headless browser (tests/test_report.py) check that every figure decoded.
addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.imagesOk = images.filter((i) => i.complete && i.naturalWidth > 0).length;
}});
</script>
</head><body>
<h1>{title}</h1>
{header}
{body}
</body></html>
"""


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m spin_ray.report RUN_DIR (a run.output_dir of jobs/spin.py)", file=sys.stderr)
        return 2
    print(write_report(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
