"""An lm-eval-harness model over a kiln :class:`~kiln.engine.base.Engine` (imported only when lm-eval is
installed).

Scoring uses ``Engine.logits`` and generation ``Engine.generate``, so every backend is evaluated by the
same code. Inputs longer than the engine's limits are truncated from the left, as lm-eval's own HF model
does: log-likelihood windows keep the last ``max_seq_len`` tokens of context + continuation, generation
prompts keep their last ``min(max_input_len, max_seq_len - max_gen_toks)`` tokens.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from kiln.engine.base import Engine, GenerationRequest, SamplingParams
from kiln.errors import GenerationLimitError

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


class EngineLM(TemplateLM):
    """lm-eval's ``LM`` interface (loglikelihood, loglikelihood_rolling, generate_until) on a kiln engine."""

    def __init__(
        self, engine: Engine, tokenizer: Any, *, max_seq_len: int, max_input_len: int, batch_size: int = 1
    ) -> None:
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise ValueError("the engine's tokenizer has no eos token: lm-eval needs one to end generations")
        self.engine, self.tokenizer = engine, tokenizer
        self.max_seq_len, self.max_input_len, self.batch_size = max_seq_len, max_input_len, max(1, batch_size)
        self.truncated = 0
        """How many inputs were cut from the left to fit the engine (reported with the task's results)."""

    # --- tokenization (TemplateLM builds loglikelihood requests from these) ------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's HF model: BOS when the tokenizer has one, else EOS, conditions an empty context.
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "kiln-engine")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # --- scoring --------------------------------------------------------------------------------------
    def continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding reproduces it) from context
        logits."""
        if not continuation:
            raise ValueError("lm-eval sent an empty continuation to score")
        if len(continuation) > self.max_seq_len:
            raise GenerationLimitError(
                f"a continuation of {len(continuation)} tokens exceeds the engine's "
                f"max_seq_len {self.max_seq_len}: build the engine with a larger limit"
            )
        whole = context + continuation
        if len(whole) > self.max_seq_len + 1:
            self.truncated += 1
        window = whole[-(self.max_seq_len + 1) :][:-1]
        logprobs = torch.log_softmax(self.engine.logits(window).float(), dim=-1)[-len(continuation) :]
        target = torch.tensor(continuation, dtype=torch.long)
        logprob = float(logprobs.gather(1, target.unsqueeze(1)).sum())
        greedy = bool((logprobs.argmax(-1) == target).all())
        return logprob, greedy

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        results = []
        for key, context, continuation in requests:
            answer = self.continuation_logprob(list(context), list(continuation))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in windows of ``max_seq_len`` (lm-eval's rolling scheme)."""
        totals = []
        for (string,) in (req.args for req in requests):
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_seq_len,
                    context_len=1,
                ),
            )
            total = sum(self.continuation_logprob(list(ctx), list(cont))[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    # --- generation -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prepared = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
            max_gen = max(1, min(int(kwargs.pop("max_gen_toks")), self.max_seq_len - 1))
            room = min(self.max_input_len, self.max_seq_len - max_gen)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            if len(ids) > room:
                self.truncated += 1
                ids = ids[-room:]
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            sampling = SamplingParams(
                max_new_tokens=max_gen,
                temperature=temperature,
                top_p=float(kwargs.get("top_p") or 1.0),
                top_k=int(kwargs.get("top_k") or 0),
                seed=0 if temperature else None,
                stop_token_ids=(self.eot_token_id,),
            )
            prepared.append((context, gen_kwargs, until, GenerationRequest(ids, sampling)))
        outputs: list[str] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            for (context, gen_kwargs, until, _), result in zip(
                chunk, self.engine.generate([p[3] for p in chunk]), strict=True
            ):
                text = self.tok_decode([t for t in result.token_ids if t != self.eot_token_id])
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                outputs.append(text)
        return outputs
