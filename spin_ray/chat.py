"""Where an answer starts and ends under a model's chat template, for the real answers y and the
engines' y' alike.

The prompt is the conversation without its last turn, rendered with the generation prompt; y is
what the full render adds after it, cut after the first stop token: the tokenizer's EOS, the
model's `generation_config.eos_token_id` (one id or a list), and the template's end of turn. The
engines stop at the same tokens (vLLM's `stop_token_ids`), so y' = y can hold. Templates write more
after the end of turn (ChatML, Zephyr and Gemma a newline, Phi-3 an EOS) that no answer generated
ever has.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

PROBE = "SPIN-RAY-PROBE"  # an assistant turn's content, to find what the template writes after one


def end_of_turn(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, `<|end|>`, `</s>`), or None when it closes with plain text only."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = tokenizer.encode(text[text.rindex(PROBE) + len(PROBE) :], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((i for i in tail if i in special), None)


def stop_token_ids(tokenizer: Any, eos_token_id: int | list[int] | None = None) -> list[int]:
    """The ids an answer ends at: EOS, the generation config's `eos_token_id`, the end of turn."""
    ids = [tokenizer.eos_token_id, end_of_turn(tokenizer)]
    ids += eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    return sorted({i for i in ids if i is not None})


def model_stop_ids(tokenizer: Any, model_dir: str) -> list[int]:
    """stop_token_ids of a model dir: its generation config's EOS ids (else its config's) too."""
    from transformers import AutoConfig, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = getattr(AutoConfig.from_pretrained(model_dir), "eos_token_id", None)
    return stop_token_ids(tokenizer, eos)


def cut_at_stop(ids: list[int], stops: Collection[int]) -> list[int]:
    """`ids` up to and including the first stop token: where generation would have ended."""
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stops), ids)


def encode(tokenizer: Any, messages: list[dict[str, str]], stops: Collection[int]) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, response ids up to the first stop token)."""
    prompt_ids = list(
        tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    full_ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, cut_at_stop(full_ids[len(prompt_ids) :], stops)
    # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property.
    response = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    return prompt_ids, response + [tokenizer.eos_token_id]
