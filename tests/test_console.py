"""The console: plain progress lines with rate and ETA, terminal bars, and log capture."""

import os
import subprocess
import sys
import textwrap

from spin_ray.driver.console import Console
from spin_ray.loop.progress import Progress, iteration_line, table


def events(progress: Progress, times: list[float]) -> list[dict]:
    """The progress record with its clock replaced by `times`, one per event."""
    got = progress.read(0)
    for event, when in zip(got, times, strict=True):
        event["time"] = when
    return got


def test_plain_lines_report_count_rate_and_eta(tmp_path, capsys):  # PLAIN_EVERY_S is 30 s
    progress = Progress(iterations=3)
    with progress.phase(1, "generate", 500, "prompts") as advance:
        advance(100)  # t=10: before the first periodic line is due
        advance(250)  # t=31: a periodic line
    with progress.phase(1, "export", None, "checkpoint"):
        pass
    console = Console(tmp_path, tty=False)
    for event in events(progress, [0, 10, 31, 62, 62, 63.5]):
        console._draw(event)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[1/3] generate     250/500 prompts, 8.1 prompts/s, ETA 31.0s",
        "[1/3] generate     250/500 prompts in 1m02s (4.0 prompts/s)",
        "[1/3] export       done in 1.5s",
    ]
    assert set(progress.seconds[1]) == {"time/generate_s", "time/export_s"}


def test_overlapping_phases_keep_their_own_counts_and_clocks(tmp_path, capsys):
    """Streaming: training starts while generation runs, and ends after it."""
    progress = Progress(iterations=3)
    generate, train = progress.phase(2, "generate", 500, "prompts"), progress.phase(2, "train", None, "steps")
    advance_generation, advance_training = generate.__enter__(), train.__enter__()
    advance_generation(500)
    advance_training(10)
    generate.__exit__(None, None, None)
    advance_training(32)
    train.__exit__(None, None, None)
    console = Console(tmp_path, tty=False)
    for event in events(progress, [0, 1, 2, 3, 4, 9, 10]):
        console._draw(event)
    assert capsys.readouterr().out.splitlines() == [
        "[2/3] generate     500/500 prompts in 4.0s (125.0 prompts/s)",
        "[2/3] train        32 steps in 9.0s (3.6 steps/s)",
    ]


def test_an_evaluation_is_labelled_by_the_model_it_scores():
    """p_0's evaluation runs beside iteration 1, after "[1/3] export" of a resumed run, say."""
    progress = Progress(iterations=3)
    with progress.phase(0, "eval", 3, "prompts"):
        pass
    assert progress.read(0)[0]["label"] == "[p_0] eval" and set(progress.seconds[0]) == {"time/eval_s"}


def test_terminal_draws_one_bar_per_phase(tmp_path, capsys):
    progress = Progress(iterations=2)
    with progress.phase(2, "train", None, "steps") as advance:
        advance(8, 32)
        advance(32, 32)
    console = Console(tmp_path, tty=True)
    for event in progress.read(0):
        console._draw(event)
    out = capsys.readouterr().out
    assert "[2/2] train" in out and "32/32" in out and "100%" in out


def test_faults_from_events_jsonl_reach_the_console(tmp_path, capsys):
    (tmp_path / "events.jsonl").write_text('{"time": 1, "kind": "old_fault"}\n')
    console = Console(tmp_path, tty=False)  # a resumed run: faults of the run before stay quiet
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('{"time": 2, "kind": "engine_replaced", "old_pid": 7, "recovery_s": 13.2}\n')
    console._faults()
    assert capsys.readouterr().out == "[fault] engine_replaced: old_pid=7, recovery_s=13.2\n"


def test_iteration_line_and_table():
    history = [
        {"iteration": 0, "eval/logps/real": -1.5, "eval/accuracy": 0.5},
        {"iteration": 1, "train/loss": 0.69, "eval/accuracy": 0.625, "time/iteration_s": 75.0},
    ]
    assert iteration_line(history[1], 3) == "[1/3] done in 1m15s: loss 0.6900  eval_acc 0.6250"
    rows = table(history).splitlines()
    assert rows[1].split() == ["start", "-", "-", "-", "-", "-", "-1.5000", "0.5000", "-"]
    assert rows[2].split() == ["1", "0.6900", "-", "-", "-", "-", "-", "0.6250", "75.0000"]


def test_capture_output_sends_c_level_output_to_the_named_log(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from spin_ray.logs import capture_output, name_log
        capture_output()
        print("from python", flush=True)
        os.write(2, b"from C\\n")
        name_log("engine")
        """
    )
    env = os.environ | {"SPIN_RAY_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout == proc.stderr == ""
    (log,) = (tmp_path / "logs").iterdir()
    assert log.name == f"engine-{log.name.split('-')[1]}" and log.read_text() == "from python\nfrom C\n"
