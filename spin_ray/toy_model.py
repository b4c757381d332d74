"""The toy world's model side: a character tokenizer with a chat template, a tiny Llama, and the
plain-torch SFT that makes p_0 (spin_ray.toy builds the world with them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

MAX_POSITIONS = 512  # room for the 128+ token prompts that expose a stale vLLM prefix cache

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|end|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]

# Every turn is "<|role|>content<|end|>" and <|end|> is the EOS token, so the assistant
# turn ends with EOS and generation stops there. The generation prompt is the conversation
# so far plus "<|assistant|>", hence an exact prefix of the full conversation's rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('toy chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# ---------------------------------------------------------------------------
# tokenizer: character level, so digits are single tokens


def make_tokenizer() -> PreTrainedTokenizerFast:
    # Printable ASCII plus common whitespace, not just the corpus' 12 characters, so that
    # system prompts or other text round-trip instead of turning into <|unk|>.
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own pre-token; [\s\S] also matches newlines, unlike "."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate without the WordLevel default of spaces
    # registered as added tokens so that "<|user|>" in text is matched whole, not char by char
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # batched generation needs left padding
        model_max_length=MAX_POSITIONS,
    )


def encode_example(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of a full conversation, and where its final assistant response starts."""
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt_ids)
    p = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(p)] == p, "generation prompt must tokenize to a prefix of the conversation"
    return ids, len(p)


# ---------------------------------------------------------------------------
# model


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention supports 32/64/..., not 16
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=8,
    )
    return model


def sft_batches(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels with prompt and padding masked to -100."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels


def sft(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    stop: Callable[[], bool] | None = None,
    check_every: int = 10,
) -> int:
    """Plain AdamW SFT on response tokens (linear warmup, then constant lr).

    Calls `stop()` every `check_every` steps and returns early once it says True;
    returns the number of steps taken.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    attn = (input_ids != model.config.pad_token_id).long()
    perm, pos = torch.randperm(len(input_ids), generator=g), 0
    step = 0
    while step < max_steps:
        if stop is not None and step > 0 and step % check_every == 0 and stop():
            break
        model.train()  # stop() may have switched to eval mode
        if pos + batch_size > len(perm):  # reshuffle each epoch, drop the ragged tail
            perm, pos = torch.randperm(len(input_ids), generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = model(input_ids=input_ids[idx], attention_mask=attn[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    model.eval()
    return step


@torch.no_grad()
def greedy_responses(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 512,
) -> list[str]:
    """Greedy decoding with HF generate (left padded batches)."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts[i : i + batch_size]
        ]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


# ---------------------------------------------------------------------------
# the build
