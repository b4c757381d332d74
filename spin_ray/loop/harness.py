"""lm-evaluation-harness through the job's own engines: the paper's way of scoring p_t, with no
engine of its own.

`EngineLM` is lm-eval's model interface over `Engines`: `loglikelihood` is the engines' prompt
log-prob scoring, `generate_until` their greedy generation with the task's stop strings. Requests
are tokenized the way lm-eval's HF model does (no special tokens added; a context's trailing
spaces go to the continuation), so scores match HF log-probs of the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pyarrow as pa
from lm_eval.api.model import LM

from spin_ray.config import GenerationConfig, LmEvalConfig
from spin_ray.engines.client import Engines
from spin_ray.loop.generate import answered

LM_EVAL_MAX_GEN_TOKS = 256  # lm-eval's own models' default, for a model dir scored without a run's limits


class EngineLM(LM):
    def __init__(self, engines: Engines, tokenizer: Any, cfg: GenerationConfig, max_model_len: int, batch_size: int):
        super().__init__()
        self.engines, self.tok, self.max_len = engines, tokenizer, max_model_len
        self.g = cfg.model_copy(update={"batch_size": batch_size})
        self.advance: Callable[[int], None] = lambda done: None  # the requests answered so far
        self.done = 0

    @property
    def tokenizer_name(self) -> str:  # lm-eval keys its chat-template cache by it
        return self.tok.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context, continuation) ids as lm-eval's HFLM splits them; an empty context is the
        BOS token (EOS where there is none), and a long context loses its start."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
            return [prefix], self._encode(continuation)
        whole, head = self._encode(context + continuation), self._encode(context)
        head, tail = whole[: len(head)], whole[len(head) :]
        return head[-max(1, self.max_len - len(tail)) :], tail

    def _run(self, rows: list[dict[str, Any]], op: Callable) -> pa.Table:
        """`rows` through the engines' `op`, in their order; counted by `advance`."""
        table = pa.Table.from_pylist([{"uid": f"{i:09d}", "seed": 0, **row} for i, row in enumerate(rows)])
        before = self.done
        out = pa.concat_tables(answered(table, op, self.g, lambda k: self.advance(before + k))) if rows else table
        self.done += len(rows)
        return out.sort_by("uid")

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        rows = [dict(zip(("prompt_ids", "continuation_ids"), self._pair(*r.args), strict=True)) for r in requests]
        score = partial(self.engines.score, columns={"continuation_ids": "logp"}, greedy=True)
        out = self._run(rows, score)
        return list(zip(out["logp"].to_pylist(), out["logp_greedy"].to_pylist(), strict=True))

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy, as lm-eval's own vLLM model: one engine pass per distinct (stop strings, most
        tokens) of the requests."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = r.args[1]
            until = kwargs.get("until") or []
            key = (
                tuple([until] if isinstance(until, str) else until),
                int(kwargs.get("max_gen_toks") or self.g.max_tokens or LM_EVAL_MAX_GEN_TOKS),
            )
            groups.setdefault(key, []).append(i)
        texts = [""] * len(requests)
        for (until, max_gen_toks), indices in groups.items():
            max_tokens = min(max_gen_toks, self.max_len - 1)
            keep = self.max_len - max_tokens
            rows = [{"prompt_ids": self._encode(requests[i].args[0])[-keep:]} for i in indices]
            greedy = partial(self.engines.generate, greedy=True, max_tokens=max_tokens, stop=list(until) or None)
            for i, text in zip(indices, self._run(rows, greedy)["generated"].to_pylist(), strict=True):
                texts[i] = text
        return texts

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        raise NotImplementedError("perplexity tasks (loglikelihood_rolling) are not run through the engines")


def results_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's results as flat metrics: `eval/lm_eval/<task>/<metric>`, with the filter's name
    after the metric unless it is `none` (e.g. exact_match_strict-match)."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, filtered = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool) and filtered:
                name = metric if filtered == "none" else f"{metric}_{filtered}"
                metrics[f"eval/lm_eval/{task}/{name}"] = float(value)
    return metrics


def lm_eval_metrics(lm: EngineLM, cfg: LmEvalConfig, tasks: Any, seed: int) -> dict[str, float]:
    """cfg's tasks (found by the lm-eval TaskManager `tasks`) scored on the model the engines of
    `lm` serve now."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm,
        tasks=cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=tasks,
        apply_chat_template=cfg.chat_template,
        log_samples=False,
        bootstrap_iters=0,  # no stderr resampling: seconds instead of minutes per task
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results_metrics(results)
