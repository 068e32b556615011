"""Next-token choice for a whole batch at once: penalties, biases, temperature, top-k, top-p, seeds.

The logits are changed in this order: repetition penalty (HF's, multiplicative), presence and
frequency penalties (OpenAI's, subtracted), logit biases (added), min_new_tokens (stop tokens
banned), a structured-output grammar (tokens that would leave it banned); then greedy argmax, or
temperature, top-k, top-p, min-p, typical-p (HF's warpers' order) and a draw. Log-probabilities are
those of the model, before any of it.

Everything is a tensor operation over the batch except drawing the random numbers, which uses
each request's own generator so that a seed gives the same tokens whatever else is batched (up
to the rounding of the step's arithmetic, which the batch's shape can change).
Sampling draws `argmax(p / E)` with E ~ Exponential(1) (the Gumbel-max trick), which needs no
normalised cumulative sum and no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from starchat.engine.guided import allowed_tokens
from starchat.engine.request import Request
from starchat.engine.speculative import accepted_tokens, draft_rows


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None, or (chosen token's logprob, [(token_id, logprob)] top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


@dataclass
class PendingSample:
    """A batch's choices as device tensors, queued but not read back: `result()` waits for them."""

    requests: list[Request]
    chosen: torch.Tensor  # (N,) int64
    chosen_logprobs: torch.Tensor | None = None  # (N,) where some request asked for logprobs
    top_values: torch.Tensor | None = None  # (N, top_n)
    top_ids: torch.Tensor | None = None

    def result(self) -> SamplerOutput:
        token_ids = self.chosen.tolist()
        logprobs_out: list = [None] * len(self.requests)
        if self.chosen_logprobs is not None:
            chosen_lp = self.chosen_logprobs.tolist()
            top_values = self.top_values.tolist() if self.top_values is not None else None
            top_ids = self.top_ids.tolist() if self.top_ids is not None else None
            for i, request in enumerate(self.requests):
                n = request.params.logprobs
                if n is None:
                    continue
                alternatives = list(zip(top_ids[i][:n], top_values[i][:n])) if n else []
                logprobs_out[i] = (chosen_lp[i], alternatives)
        return SamplerOutput(token_ids, logprobs_out)


class Sampler:
    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 greedy_tokens: torch.Tensor | None = None) -> SamplerOutput:  # logits (N, V) float32
        return self.launch(logits, requests, greedy_tokens).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, requests: list[Request],
               greedy_tokens: torch.Tensor | None = None) -> PendingSample:  # logits (N, V) float32
        """Queue the choices without reading them back (on a GPU the host goes on while they run).
        `greedy_tokens`: each row's argmax when the caller has it (the CPU decode step computes it
        while the logits are in cache); used where no penalty changes the logits."""
        device = logits.device
        unchanged = logits
        want_logprobs = [r.params.logprobs is not None for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        logits = self._process(logits, requests)

        greedy_rows = [i for i, r in enumerate(requests) if r.params.greedy]
        sample_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        given = greedy_tokens if greedy_tokens is not None and logits is unchanged else None
        if not sample_rows:
            chosen = given if given is not None else argmax_rows(logits)
        else:
            chosen = torch.empty(len(requests), dtype=torch.long, device=device)
            if greedy_rows:
                rows = torch.tensor(greedy_rows, device=device)
                chosen[rows] = given[rows] if given is not None else argmax_rows(logits[rows])
            rows = torch.tensor(sample_rows, device=device)
            chosen[rows] = self._sample(logits[rows], [requests[i] for i in sample_rows])
        pending = PendingSample(requests, chosen)
        if raw_logprobs is not None:
            top_n = max(r.params.logprobs or 0 for r in requests)
            pending.chosen_logprobs = raw_logprobs.gather(1, chosen[:, None]).squeeze(1)
            if top_n:
                pending.top_values, pending.top_ids = raw_logprobs.topk(top_n, dim=-1)
        return pending

    def _process(self, logits: torch.Tensor, requests) -> torch.Tensor:
        """The logits each request's next token is chosen from (the input itself when nothing applies)."""
        logits = self._apply_repetition_penalty(logits, requests)
        logits = self._apply_output_penalties(logits, requests)
        logits = self._apply_logit_bias(logits, requests)
        logits = self._apply_min_new_tokens(logits, requests)
        return self._apply_grammar(logits, requests)

    def _apply_grammar(self, logits: torch.Tensor, requests) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return logits
        allowed = allowed_tokens([(requests[i].grammar, requests[i].drafts_before) for i in rows],
                                 logits.shape[1]).to(logits.device)
        row_index = torch.tensor(rows, device=logits.device)
        logits = logits.clone()
        logits[row_index] = logits[row_index].masked_fill(~allowed, float("-inf"))
        return logits

    @torch.inference_mode()
    def verify(self, logits: torch.Tensor, greedy_tokens: torch.Tensor | None,
               verifying: list[tuple[Request, list[int]]]) -> list[SamplerOutput]:
        """Speculative decodes: which drafts to keep, and the token after them, per request.

        `logits` has a row per verified position, each request's rows in order: after its last
        token, then after each draft. A row is processed as if the drafts before it were accepted
        (penalties and min_new_tokens see them). Greedy requests keep the drafts that equal the
        row's argmax, then take the next argmax. Sampling requests keep draft d with probability
        p(d) (the row's distribution after temperature and the top-k, top-p, min-p and typical-p
        filters) and, at the first
        rejection, draw from p with d removed: a drafter that proposes one token with certainty
        makes that the standard speculative-sampling rule, so every token is distributed as
        without drafts (not the same draws: a seed's tokens differ, which is why seeded requests
        are not drafted for)."""
        rows = [row for request, drafts in verifying for row in draft_rows(request, drafts)]
        processed = self._process(logits, rows)
        targets: dict[int, int] = {}  # greedy rows' choices by row
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if greedy:
            if greedy_tokens is None or processed is not logits:
                greedy_tokens = argmax_rows(processed[torch.tensor(greedy, device=logits.device)])
            else:
                greedy_tokens = greedy_tokens[greedy]
            targets = dict(zip(greedy, greedy_tokens.tolist()))
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            probs, candidate_ids = self._distribution(processed[torch.tensor(sampled, device=logits.device)],
                                                      [rows[i] for i in sampled])
            probs = probs / probs.sum(dim=-1, keepdim=True)
            # Each sampled row's probability of the draft that follows it (the last row has none: -1).
            next_draft = torch.tensor([rows[i].next_draft for i in sampled], device=logits.device)
            draft_probs = (probs * (candidate_ids == next_draft[:, None])).sum(dim=-1).tolist()
            sampled_at = {row: k for k, row in enumerate(sampled)}
        want_logprobs = any(row.params.logprobs is not None for row in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        outputs, first = [], 0
        for request, drafts in verifying:
            if request.params.greedy:
                tokens = accepted_tokens(drafts, [targets[row] for row in range(first, first + len(drafts) + 1)])
            else:
                k = sampled_at[first]
                tokens = self._accept_sampled(drafts, draft_probs[k:k + len(drafts)], probs[k:k + len(drafts) + 1],
                                              candidate_ids[k:k + len(drafts) + 1], request.generator)
            logprobs = [None] * len(tokens)
            if request.params.logprobs is not None:  # each token's from the row that chose it
                logprobs = _chosen_logprobs(raw_logprobs[first:first + len(tokens)], tokens, request.params.logprobs)
            outputs.append(SamplerOutput(tokens, logprobs))
            first += len(drafts) + 1
        return outputs

    @staticmethod
    def _accept_sampled(drafts: list[int], draft_probs: list[float], probs: torch.Tensor, candidate_ids: torch.Tensor,
                        generator: torch.Generator) -> list[int]:
        """probs/candidate_ids: (len(drafts) + 1, K) normalised distributions of the request's rows."""
        uniform = torch.rand(len(drafts), generator=generator, device=generator.device).tolist()
        accepted = 0
        while accepted < len(drafts) and uniform[accepted] < draft_probs[accepted]:
            accepted += 1
        row_probs, row_ids = probs[accepted], candidate_ids[accepted]
        if accepted < len(drafts):  # rejected: the rest of the distribution, the draft taken out
            row_probs = row_probs.masked_fill(row_ids == drafts[accepted], 0.0)
        noise = torch.empty_like(row_probs).exponential_(generator=generator)
        return drafts[:accepted] + [int(row_ids[(row_probs / noise).argmax()])]

    def _apply_repetition_penalty(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
        if not rows:
            return logits
        # As transformers does: every token of prompt and output so far is penalised once. The
        # (row, token) pairs are indexed directly: a token seen twice writes the same value twice.
        histories = [np.asarray(requests[i].all_token_ids, dtype=np.int64) for i in rows]
        lengths = [len(history) for history in histories]
        row_index = torch.from_numpy(np.repeat(np.asarray(rows, dtype=np.int64), lengths)).to(logits.device)
        token_index = torch.from_numpy(np.concatenate(histories)).to(logits.device)
        penalties = [requests[i].params.repetition_penalty for i in rows]
        penalty = torch.from_numpy(np.repeat(np.asarray(penalties, dtype=np.float32), lengths)).to(logits.device)
        selected = logits[row_index, token_index]
        logits = logits.clone()
        logits[row_index, token_index] = torch.where(selected < 0, selected * penalty, selected / penalty)
        return logits

    def _apply_output_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.presence_penalty or r.params.frequency_penalty]
        if not rows:
            return logits
        device, vocab = logits.device, logits.shape[-1]
        outputs = [requests[i].output_token_ids for i in rows]
        width = max(1, max(len(o) for o in outputs))
        padded = torch.tensor([o + [vocab] * (width - len(o)) for o in outputs], device=device)  # pad: an extra column
        counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
        counts = counts[:, :vocab]  # (R, V) occurrences of each token in the output so far
        frequency = torch.tensor([requests[i].params.frequency_penalty for i in rows], device=device)[:, None]
        presence = torch.tensor([requests[i].params.presence_penalty for i in rows], device=device)[:, None]
        row_index = torch.tensor(rows, device=device)
        logits = logits.clone()
        logits[row_index] -= frequency * counts + presence * (counts > 0)
        return logits

    def _apply_logit_bias(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [(i, r.params.logit_bias) for i, r in enumerate(requests) if r.params.logit_bias]
        if not rows:
            return logits
        logits = logits.clone()
        for i, bias in rows:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
        return logits

    def _apply_min_new_tokens(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        blocked = [(i, r.stop_token_ids | {self.eos_token_id}) for i, r in enumerate(requests)
                   if len(r.output_token_ids) < r.params.min_new_tokens]
        if not blocked:
            return logits
        logits = logits.clone()
        for i, ids in blocked:
            logits[i, list(ids)] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:  # (S, V) -> (S,)
        probs, candidate_ids = self._distribution(logits, requests)
        noise = torch.empty_like(probs)
        for row, request in enumerate(requests):
            noise[row].exponential_(generator=request.generator)
        picked = (probs / noise).argmax(dim=-1, keepdim=True)  # (S, 1)
        return candidate_ids.gather(1, picked).squeeze(1)

    @staticmethod
    def _distribution(logits: torch.Tensor, requests) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's distribution after temperature and the top-k, top-p, min-p and typical-p filters, over its top-K candidates:
        (S, K) probabilities (not renormalised after top-p: the draw does not need it) and token ids."""
        device = logits.device
        vocab = logits.shape[-1]
        temperature = torch.tensor([r.params.temperature for r in requests], device=device)[:, None]
        logits = logits / temperature
        per_row_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in requests]
        # One sorted top-K over the batch; K is the largest k asked (the whole vocabulary only if some row has no top-k).
        candidates, candidate_ids = logits.topk(max(per_row_k), dim=-1)  # (S, K), descending
        rank = torch.arange(candidates.shape[1], device=device)[None, :]
        candidates = candidates.masked_fill(rank >= torch.tensor(per_row_k, device=device)[:, None], float("-inf"))
        probs = torch.softmax(candidates, dim=-1)
        top_p = torch.tensor([r.params.top_p for r in requests], device=device)[:, None]
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
        if any(r.params.min_p > 0.0 for r in requests):  # relative to the most likely token (column 0)
            min_p = torch.tensor([r.params.min_p for r in requests], device=device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
        if any(r.params.typical_p < 1.0 for r in requests):
            probs = _typical_filter(probs, torch.tensor([r.params.typical_p for r in requests], device=device))
        return probs, candidate_ids


def _chosen_logprobs(row_logprobs: torch.Tensor, tokens: list[int], top_n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """(chosen token's logprob, top_n alternatives) for each token, from its row of log-probabilities."""
    chosen = row_logprobs.gather(1, torch.tensor(tokens, device=row_logprobs.device)[:, None]).squeeze(1).tolist()
    if not top_n:
        return [(logprob, []) for logprob in chosen]
    values, ids = row_logprobs.topk(top_n, dim=-1)
    return [(logprob, list(zip(row_ids, row_values))) for logprob, row_ids, row_values in zip(chosen, ids.tolist(), values.tolist())]


def _typical_filter(probs: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.; HF's TypicalLogitsWarper): rank the candidates by
    how far their surprise -log p is from the entropy of the distribution (renormalised over what
    top-k and top-p left), and keep the closest ones until their mass reaches typical_p (at least
    one). probs (S, K) as _distribution has them; rows with typical_p = 1 stay as they are."""
    p = probs / probs.sum(dim=-1, keepdim=True)
    log_p = torch.log(p)  # -inf where a filter removed the token
    entropy = -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1, keepdim=True)
    distance = torch.where(p > 0, (-log_p - entropy).abs(), float("inf"))
    sorted_distance, order = distance.sort(dim=-1)  # nearest the entropy first
    mass = p.gather(1, order).cumsum(dim=-1)
    last = (mass < typical_p[:, None]).sum(dim=-1, keepdim=True).clamp(max=probs.shape[1] - 1)
    remove = (distance > sorted_distance.gather(1, last)) & (typical_p < 1.0)[:, None]
    return probs.masked_fill(remove, 0.0)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), int64. On a CPU through NumPy: its argmax is vectorised, PyTorch's
    takes 50-120 us per 49,152-logit row on an AVX2 CPU (1.9 ms for 32 rows, NumPy 0.17). Both
    return the first of equal maxima and the index of a NaN, so the tokens are the same."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return logits.argmax(dim=-1)
    return torch.from_numpy(logits.contiguous().numpy().argmax(axis=-1).astype("int64", copy=False))
