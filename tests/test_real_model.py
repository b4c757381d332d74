"""The whole job on a real chat model: SmolLM2-135M-Instruct (model.path=smollm2, ChatML).

One run of two submissions shares its start-ups between every assertion: iteration 1 with the
object-store sync, then the same run dir resumed to iteration 2 with the gloo broadcast, both
carrying the full 538 MB fp32 model; the live endpoint answers the official `openai` client
throughout, and an lm-eval task runs through the engines. Greedy (temperature 0), so y' is what
HF greedy decoding of the engines' weights gives.
"""

import json
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import free_port, hf_greedy, prompt_ids, write_task
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from spin_ray.chat import encode, model_stop_ids
from spin_ray.config import load_config
from spin_ray.data import load_sft
from spin_ray.smollm2 import smollm2_world
from spin_ray.toy import read_jsonl
from spin_ray.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MODEL_BYTES = 134_515_008 * 4  # every parameter in fp32, the tied embedding once
MAX_GEN_TOKS = 8  # the lm-eval task's and the live endpoint's answers: within the engines' context (the data's)


def ask_live(url: str, question: str, stop: threading.Event, out) -> None:
    """Asks the live endpoint with the official client until `stop`; appends (model, answer)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": question}]
    while not stop.is_set():
        try:
            reply = client.chat.completions.create(
                model="spin-live", messages=messages, temperature=0, max_tokens=MAX_GEN_TOKS
            )
            out.append((reply.model, reply.choices[0].message.content))
        except openai.OpenAIError:
            pass  # not up yet, or between the two submissions
        stop.wait(0.5)


def greedy_record(tok, model) -> dict:
    """A record whose real answer is p_0's own greedy answer, token for token: its pair's y' = y.
    The question has a short answer (shorter than the task's, which set generation.max_tokens)."""
    question = "What is the capital of France?"
    ids = hf_greedy(model, tok, [prompt_ids(tok, question)], 16)[0]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": tok.decode(ids[:-1])}]
    assert encode(tok, messages, model_stop_ids(tok, model.name_or_path))[1] == ids, tok.decode(ids)
    return {"id": "p0-greedy", "messages": messages}


@pytest.fixture(scope="module")
def real_run(ray_session, tmp_path_factory):
    from ray import serve

    from spin_ray.driver.job import run_job
    from spin_ray.driver.prepare import prepare

    world = smollm2_world(0)
    root = tmp_path_factory.mktemp("smollm2")
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    p0 = AutoModelForCausalLM.from_pretrained(world.model_dir, dtype=torch.float32).eval()
    train = read_jsonl(world.train_path)[:7]
    train.append(greedy_record(tok, p0))
    held_out = read_jsonl(world.eval_path)[:4]
    questions = [r["messages"][0]["content"] for r in held_out]
    # The lm-eval task's targets are p_0's HF greedy answers: the engines' greedy must score 1.0 on p_0.
    targets = [tok.decode(ids, skip_special_tokens=True) for ids in greedy(p0, tok, questions)]
    for name, rows in (("train", train), ("eval", held_out)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"question": q, "answer": a} for q, a in zip(questions, targets, strict=True)]
    tasks = write_task(root / "tasks", "smollm2_word_problems", rows, max_gen_toks=MAX_GEN_TOKS)
    port, stop, answers = free_port(), threading.Event(), []
    asker = threading.Thread(target=ask_live, args=(f"http://127.0.0.1:{port}/v1", questions[0], stop, answers))
    asker.start()
    summaries = []
    try:
        for iterations, sync in ((1, "object_store"), (2, "broadcast")):
            cfg = load_config(
                ROOT / "configs" / "smollm2.yaml",
                [
                    f"run.output_dir={root / 'run'}",
                    f"data.train_path={root / 'train.jsonl'}",
                    f"data.eval_path={root / 'eval.jsonl'}",
                    "train.lora=null",  # full fine-tuning: the whole model travels to the engines
                    "train.lr=1e-4",  # weights move visibly in a few steps
                    "generation.temperature=0",
                    f"spin.iterations={iterations}",
                    f"sync.method={sync}",
                    "serve.live=true",
                    f"serve.port={port}",
                    f"serve.max_tokens={MAX_GEN_TOKS}",
                    "eval.lm_eval.tasks=[smollm2_word_problems]",
                    "eval.lm_eval.chat_template=true",
                    f"eval.lm_eval.include_path={tasks}",
                ],
            )
            summaries.append(run_job(cfg, prepare(cfg)))
    finally:
        stop.set()
        asker.join()
        serve.shutdown()
    return root / "run", world, summaries, answers, targets


def greedy(model, tok, questions: list[str]) -> list[list[int]]:
    return hf_greedy(model, tok, [prompt_ids(tok, q) for q in questions], MAX_GEN_TOKS)


def test_a_pair_whose_generated_answer_is_the_real_one_counts_as_identical(real_run):
    """y ends at <|im_end|> like y' (not at the template's newline after it), so p_0's own greedy
    answer as y gives y' = y: identical, 1 pair of 8."""
    out, world, *_ = real_run
    pairs = {r["uid"]: r for r in pq.read_table(out / "iter_1" / "pairs").to_pylist()}
    assert len(pairs) == 8
    assert pairs["p0-greedy"]["generated_ids"] == pairs["p0-greedy"]["real_ids"]
    assert all(r["real_ids"][-1] == 2 and r["real_ids"].count(2) == 1 for r in pairs.values())  # <|im_end|>, once
    assert sum(r["generated_ids"] == r["real_ids"] for r in pairs.values()) == 1
    rows = [r for r in read_metrics(out) if "global_step" in r]
    assert rows[0]["train/pairs/identical"] == pytest.approx(1 / 8)


def test_token_limits_came_from_the_data(real_run):
    """No token limit was set: the run took the data's (the stored config holds them), y' as long as
    the longest y."""
    out, world, *_ = real_run
    stored = load_config(out / "config.yaml")
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    stops = model_stop_ids(tok, str(world.model_dir))
    rows = pq.read_table(out / "iter_1" / "pairs").to_pylist()
    rows += [
        vars(e)
        for e in load_sft(out.parent / "eval.jsonl", tok, max_prompt_tokens=None, max_response_tokens=None, stops=stops)
    ]
    assert stored.data.max_prompt_tokens == max(len(r["prompt_ids"]) for r in rows)
    assert stored.data.max_response_tokens == stored.generation.max_tokens == max(len(r["real_ids"]) for r in rows)


def test_each_swap_serves_the_exported_weights_on_both_sync_paths(real_run):
    """Iteration 2's greedy pairs (engines after the object-store swap of p_1) are HF greedy of
    iter_1/model; p_2 came through the broadcast; both moved every byte of the fp32 model."""
    out, world, summaries, *_ = real_run
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    p1 = AutoModelForCausalLM.from_pretrained(out / "iter_1" / "model", dtype=torch.float32).eval()
    pairs = pq.read_table(out / "iter_2" / "pairs").to_pylist()
    max_tokens = load_config(out / "config.yaml").generation.max_tokens
    assert [r["generated_ids"] for r in pairs] == hf_greedy(p1, tok, [r["prompt_ids"] for r in pairs], max_tokens)
    rows = [r for r in read_metrics(out) if "global_step" in r]
    assert all(MODEL_BYTES <= r["sync/bytes"] < MODEL_BYTES + 2**20 for r in rows) and len(rows) == 2
    before, after = (load_file(out / f"iter_{t}" / "model" / "model.safetensors") for t in (1, 2))
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    # The resumed submission started at iteration 2: it evaluated p_1, trained p_2, nothing before.
    assert [[row["iteration"] for row in s["history"]] for s in summaries] == [[0, 1], [1, 2]]
    # configs/smollm2.yaml runs the phases one at a time (eval.beside=false): each submission
    # evaluated its start model before the engines made a pair.
    assert all(s["startup_s"]["start_evaluated"] < s["startup_s"]["first_pair"] for s in summaries)


def test_live_endpoint_and_lm_eval_run_on_the_real_model(real_run):
    """The official client gets chat-templated answers from the engines, equal to HF greedy of
    the p_t they hold after each swap; the lm-eval task (generate_until through the same engines, targets
    p_0's HF greedy answers) scores p_0 at 1.0, then p_1 and p_2."""
    out, world, _, answers, targets = real_run
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    seen = {int(model.removeprefix("spin-live-iter-")) for model, _ in answers}
    assert {0, 2} <= seen, answers  # p_2 came by the broadcast
    question = read_jsonl(out.parent / "eval.jsonl")[0]["messages"][0]["content"]
    for t in seen:
        model_dir = out / f"iter_{t}" / "model" if t else world.model_dir
        p_t = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        expected = targets[0] if t == 0 else tok.decode(greedy(p_t, tok, [question])[0], skip_special_tokens=True)
        assert {text for model, text in answers if model == f"spin-live-iter-{t}"} == {expected}, t
    rows = [r for r in read_metrics(out) if "eval/lm_eval/smollm2_word_problems/exact_match" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/lm_eval/smollm2_word_problems/exact_match"] == 1.0
