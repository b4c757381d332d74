"""Held-out evaluation of the weights the engines serve now (p_t), beside the next iteration.

Three passes over the held-out prompts through the job's own engines (a fresh sample y' per
prompt, both answers scored, a greedy answer), turned into numbers by spin_ray.metrics; then the
lm-eval tasks of eval.lm_eval through the same engines (spin_ray.loop.harness), then the user's
hooks. lm-eval and the hooks run after p_t is trained and exported: a failure there is reported
and the run goes on without their numbers (rerunning would fail the same way).
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa

from spin_ray.config import Config
from spin_ray.engines.client import Engines
from spin_ray.loop.generate import answered, example_rows
from spin_ray.loop.progress import Progress
from spin_ray.lora import split
from spin_ray.metrics import answer_metrics, isolated, load_hooks, run_hooks
from spin_ray.stages import Prepared


class Evaluator:
    def __init__(self, cfg: Config, prepared: Prepared, engines: Engines, progress: Progress):
        self.cfg, self.p, self.engines, self.progress = cfg, prepared, engines, progress
        self.hooks = load_hooks(cfg.eval.hooks)
        self.harness = None
        if lm := cfg.eval.lm_eval:  # lm-eval is imported only by runs that ask for it
            from lm_eval.tasks import TaskManager
            from transformers import AutoTokenizer

            from spin_ray.loop.harness import EngineLM

            tokenizer = AutoTokenizer.from_pretrained(split(prepared.model_path)[0])
            lm_model = EngineLM(engines, tokenizer, cfg.generation, prepared.max_model_len, lm.batch_size)
            self.harness = (lm_model, TaskManager(include_path=lm.include_path))

    def __call__(self, t: int, model_dir: str) -> dict[str, float]:
        return self._held_out(t) | self._lm_eval(t) | run_hooks(self.hooks, model_dir, t, self.progress.say)

    def _lm_eval(self, t: int) -> dict[str, float]:
        if self.harness is None:
            return {}
        from spin_ray.loop.harness import lm_eval_metrics

        lm, tasks = self.harness
        scores = partial(lm_eval_metrics, lm, self.cfg.eval.lm_eval, tasks, self.cfg.run.seed)
        with self.progress.phase(t, "lm-eval", None, "requests") as advance:
            lm.advance, lm.done = advance, 0
            return isolated("lm-eval", t, self.progress.say, scores)

    def _held_out(self, t: int) -> dict[str, float]:
        if not self.p.eval:
            return {}
        g = self.cfg.generation
        table = example_rows(self.p.eval, self.cfg.run.seed)
        n = table.num_rows
        with self.progress.phase(t, "eval", 3 * n, "prompts") as advance:
            sampled = pa.concat_tables(answered(table, self.engines.generate, g, advance))
            columns = {"real_ids": "logp_real", "generated_ids": "logp_generated"}  # under p_t
            score = partial(self.engines.score, columns=columns)
            scored = pa.concat_tables(answered(sampled, score, g, lambda k: advance(n + k))).sort_by("uid")
            greedy = partial(self.engines.generate, greedy=True)
            answers = pa.concat_tables(answered(table, greedy, g, lambda k: advance(2 * n + k)))
        by_uid = dict(zip(answers["uid"].to_pylist(), answers["generated"].to_pylist(), strict=True))
        examples = sorted(self.p.eval, key=lambda e: e.uid)
        greedy_answers = [by_uid[e.uid] for e in examples]
        metrics = answer_metrics(
            scored["logp_real"].to_numpy(),
            scored["logp_generated"].to_numpy(),
            [e.real_ids for e in examples],
            scored["generated_ids"].to_pylist(),
            greedy_answers,
            [e.real for e in examples],
        )
        if self.p.toy:
            from spin_ray.toy import toy_accuracy

            metrics["eval/accuracy"] = toy_accuracy([e.prompt_messages for e in examples], greedy_answers)
        return metrics
