"""lm-evaluation-harness through the engines (spin_ray.loop.harness), on the real vLLM: its
loglikelihood is HF's log-prob of the same tokens (fp32), its generate_until is HF greedy, and a
whole multiple-choice task scores what HF's log-probs pick. jobs/evaluate.py scores a model dir
the same way. (The toy task through lm-eval equals the job's own eval_acc: tests/test_job.py.)"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import hf_greedy, hf_sums, make_engines, toy_tasks
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.config import LmEvalConfig, load_config
from spin_ray.loop.evaluate import Evaluator
from spin_ray.loop.harness import EngineLM, lm_eval_metrics
from spin_ray.loop.progress import Progress
from spin_ray.metrics import check_tasks

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 40


@pytest.fixture(scope="module")
def harness(ray_session, toy, tmp_path_factory):
    engines, cfg = make_engines(toy, max_model_len=64)
    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    yield (
        EngineLM(engines, tok, cfg.generation, 64, batch_size=16),
        tok,
        toy_tasks(toy, tmp_path_factory.mktemp("tasks")),
    )
    engines.shutdown()


def questions(tasks: Path) -> list[dict]:
    rows = [json.loads(line) for line in (tasks / "spin_toy_choice.jsonl").read_text().splitlines()[:LIMIT]]
    return rows


def test_loglikelihood_is_hf_log_prob_and_a_choice_task_picks_what_hf_picks(harness, toy):
    lm, tok, tasks = harness
    model = AutoModelForCausalLM.from_pretrained(toy.model_dir, dtype=torch.float32).eval()
    rows = questions(tasks)
    contexts = [lm.apply_chat_template([{"role": "user", "content": r["question"]}]) for r in rows]
    requests = [
        SimpleNamespace(args=(c, choice)) for c, r in zip(contexts, rows, strict=True) for choice in r["choices"]
    ]
    got = lm.loglikelihood(requests)
    pairs = [lm._pair(*r.args) for r in requests]
    assert pairs[0][0] == tok.apply_chat_template(
        [{"role": "user", "content": rows[0]["question"]}], add_generation_prompt=True, return_dict=False
    )
    want = hf_sums(model, [p for p, _ in pairs], [c for _, c in pairs])
    assert [score for score, _ in got] == pytest.approx(want, abs=1e-4)
    greedy = [hf_greedy(model, tok, [p], len(c))[0][: len(c)] == c for p, c in pairs]
    assert [is_greedy for _, is_greedy in got] == greedy and any(greedy)
    # The whole task through lm-eval: its accuracy is the share of questions where HF's best choice is the answer.
    picks = [max(range(4), key=lambda k, i=i: want[4 * i + k]) for i in range(len(rows))]
    hf_acc = sum(p == r["label"] for p, r in zip(picks, rows, strict=True)) / len(rows)
    cfg = LmEvalConfig(tasks=["spin_toy_choice"], limit=LIMIT, include_path=str(tasks), chat_template=True)
    scores = lm_eval_metrics(lm, cfg, TaskManager(include_path=str(tasks)), seed=0)
    assert scores == {"eval/lm_eval/spin_toy_choice/acc": pytest.approx(hf_acc)}


def test_generate_until_is_hf_greedy_and_stops_at_the_stop_string(harness, toy):
    lm, tok, tasks = harness
    model = AutoModelForCausalLM.from_pretrained(toy.model_dir, dtype=torch.float32).eval()
    contexts = [lm.apply_chat_template([{"role": "user", "content": r["question"]}]) for r in questions(tasks)]
    got = lm.generate_until([SimpleNamespace(args=(c, {"until": [], "max_gen_toks": 8})) for c in contexts])
    want = [
        tok.decode(ids, skip_special_tokens=True) for ids in hf_greedy(model, tok, [lm._encode(c) for c in contexts], 8)
    ]
    assert got == want and len(set(got)) > 1
    # A stop string ends each answer before it; answers without it are the same as before.
    cut = lm.generate_until([SimpleNamespace(args=(c, {"until": ["1"], "max_gen_toks": 8})) for c in contexts])
    assert cut == [text.split("1")[0] for text in want] and cut != want


def test_evaluate_script_scores_a_model_dir(ray_session, toy, harness, tmp_path):
    """jobs/evaluate.py on the toy model dir: its own Ray and engines, the toy sums task."""
    _, _, tasks = harness
    out = tmp_path / "scores.jsonl"
    args = [str(toy.model_dir), "--tasks", "spin_toy_addition", "--include-path", str(tasks), "--chat-template"]
    args += ["--limit", str(LIMIT), "--max-model-len", "64", "--out", str(out), "generation.kv_cache_gib=0.25"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), *args], capture_output=True, text=True, timeout=600
    )
    console = proc.stdout.splitlines()
    log = Path(console[0].rpartition("the libraries' output: ")[2])  # a temp file: a model dir is not a run's
    assert proc.returncode == 0, proc.stdout + proc.stderr + log.read_text()[-3000:]
    assert console[0].startswith("scoring model on spin_toy_addition;") and log.parent.name.startswith("spin-ray-")
    assert console[1].startswith("model     spin_toy_addition/exact_match ")
    assert console[2:] == [f"scores appended to {out}"]
    assert "Starting execution of Dataset" in log.read_text()  # the libraries' output
    lm, _, _ = harness
    cfg = LmEvalConfig(tasks=["spin_toy_addition"], limit=LIMIT, include_path=str(tasks), chat_template=True)
    want = lm_eval_metrics(lm, cfg, TaskManager(include_path=str(tasks)), seed=0)
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["eval/lm_eval/spin_toy_addition/exact_match"] == want["eval/lm_eval/spin_toy_addition/exact_match"]


def test_unknown_task_is_refused_before_anything_starts(toy, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), str(toy.model_dir), "--tasks", "no_such_task"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "eval.lm_eval.tasks: ['no_such_task'] are not lm-eval tasks" in proc.stderr


def test_perplexity_tasks_are_refused_before_anything_starts(tmp_path):
    """The engines answer loglikelihood and generate_until requests, not loglikelihood_rolling:
    wikitext, named or in a group, would fail after iteration 1 is trained, and on every rerun."""
    (tmp_path / "with_perplexity.yaml").write_text("group: with_perplexity\ntask: [arc_easy, wikitext]\n")
    with pytest.raises(ValueError) as refused:
        check_tasks(["arc_easy", "with_perplexity", "wikitext"], str(tmp_path))
    assert str(refused.value).startswith(
        "eval.lm_eval.tasks: with_perplexity (its task wikitext), wikitext: the engines do not answer "
        "loglikelihood_rolling requests"
    )


def test_an_lm_eval_failure_is_reported_and_the_evaluation_goes_on(toy, tmp_path):
    """A task that fails inside lm-eval (here its data set is gone) costs its numbers, not the run:
    lm-eval runs after p_t is trained and exported. The hooks still run."""
    tasks = toy_tasks(toy, tmp_path / "tasks")
    (tasks / "spin_toy_addition.jsonl").unlink()
    lm_eval = ["eval.lm_eval.tasks=[spin_toy_addition]", f"eval.lm_eval.include_path={tasks}"]
    cfg = load_config(None, [*lm_eval, 'eval.hooks=["eval_hooks:checkpoint"]'])
    prepared = SimpleNamespace(model_path=str(toy.model_dir), max_model_len=64, eval=[])  # no held-out prompts
    progress = Progress(1)
    scores = Evaluator(cfg, prepared, None, progress)(1, str(toy.model_dir))  # no request reaches an engine
    assert scores == {"eval/checkpoint/iteration": 1.0, "eval/checkpoint/has_weights": 1.0}
    [said] = [event["text"] for event in progress.read(0) if event["kind"] == "line"]
    assert said.startswith("[eval] lm-eval failed on iteration 1; skipped:\n"), said
    assert "spin_toy_addition.jsonl" in said
