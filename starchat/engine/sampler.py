"""Next-token choice for a whole batch at once: penalties, biases, temperature, top-k, top-p, seeds.

The logits are changed in this order: repetition penalty (HF's, multiplicative), presence and
frequency penalties (OpenAI's, subtracted), logit biases (added), min_new_tokens (stop tokens
banned), a structured-output grammar (tokens that would leave it banned); then greedy argmax, or
temperature, top-k, top-p, min-p, typical-p (HF's warpers' order) and a draw. Log-probabilities are
those of the model, before any of it.

Everything is a tensor operation over the batch except drawing the random numbers, which uses
each request's own generator so that a seed gives the same tokens whatever else is batched (up
to the rounding of the step's arithmetic, which the batch's shape can change).
A draw is one uniform number per row, looked up in the cumulative sum of the row's probabilities
in token-id order (inverse CDF; no host synchronisation). In token-id order a rounding
difference moves the choice only where the uniform number falls within it of a boundary; a draw
over probabilities sorted by size (or noise assigned by rank, as the Gumbel-max draw did before)
changes whenever two near-equal probabilities swap places, which flat distributions are full of.
Rows without top-k are not sorted at all unless top-p or typical-p needs it (on a CPU, top-p
looks for its nucleus among the largest 256 probabilities first): sorting 49,152 logits took
3.7 ms a row on a 2-core Xeon.
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
        elif not greedy_rows:
            chosen = self._sample(logits, requests)
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
        uniform = torch.rand((1, 1), generator=generator, device=generator.device)
        return drafts[:accepted] + [int(row_ids[inverse_cdf(row_probs[None], uniform)])]

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
        # Only the tokens an output holds change: per row its distinct tokens and their counts
        # (a pass over the whole vocabulary per row cost 0.2 ms a row on a CPU).
        row_index, token_index, amounts = [], [], []
        for i in rows:
            params = requests[i].params
            tokens, counts = np.unique(np.asarray(requests[i].output_token_ids, dtype=np.int64), return_counts=True)
            row_index.append(np.full(len(tokens), i, dtype=np.int64))
            token_index.append(tokens)
            amounts.append(params.frequency_penalty * counts + params.presence_penalty)
        amount = torch.from_numpy(np.concatenate(amounts).astype(np.float32)).to(logits.device)
        logits = logits.clone()
        logits.index_put_((torch.from_numpy(np.concatenate(row_index)).to(logits.device),
                           torch.from_numpy(np.concatenate(token_index)).to(logits.device)), -amount, accumulate=True)
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
        uniform = torch.stack([torch.rand((1,), generator=request.generator, device=probs.device) for request in requests])
        return candidate_ids.gather(1, inverse_cdf(probs, uniform)).squeeze(1)

    @staticmethod
    def _distribution(logits: torch.Tensor, requests) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's distribution after temperature and the top-k, top-p, min-p and typical-p
        filters: (S, K) probabilities (zero where filtered; not renormalised, the draw does not need
        it) and their token ids, ascending along each row. K is the largest top-k asked, or the
        whole vocabulary (ids 0..V-1) if some row has none."""
        device = logits.device
        vocab = logits.shape[-1]
        # Infinite or NaN logits (a repetition penalty near 0 divides a logit into +inf; a 16-bit
        # model can overflow) would make NaN probabilities: +inf becomes the largest finite value,
        # so such tokens share the draw (the limit of large logits), and NaN is never drawn.
        # (The logits are this function's own from here on.)
        finite = dict(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
        if any(r.params.temperature != 1.0 for r in requests):
            logits = (logits / torch.tensor([r.params.temperature for r in requests], device=device)[:, None])
            logits.nan_to_num_(**finite)
        else:  # temperature 1 (the OpenAI API's default): no division
            logits = torch.nan_to_num(logits, **finite)
        per_row_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in requests]
        top_p = torch.tensor([r.params.top_p for r in requests], device=device)[:, None]
        if max(per_row_k) < vocab:
            # Every row has a top-k: filter the sorted top-K candidates, then put them in id order.
            candidates, candidate_ids = logits.topk(max(per_row_k), dim=-1)  # (S, K), descending
            rank = torch.arange(candidates.shape[1], device=device)[None, :]
            candidates = candidates.masked_fill(rank >= torch.tensor(per_row_k, device=device)[:, None], float("-inf"))
            probs = torch.softmax(candidates, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill((mass_before >= top_p) & (rank > 0), 0.0)  # (a top_p below float32's range is 0)
            candidate_ids, order = candidate_ids.sort(dim=-1)
            probs = probs.gather(1, order)
        else:
            limited = [i for i, k in enumerate(per_row_k) if k < vocab]
            if limited:  # rows with a top-k beside rows without: mask all but each row's k largest
                rows = torch.tensor(limited, device=device)
                largest = logits[rows].topk(max(per_row_k[i] for i in limited), dim=-1).indices
                within_k = torch.arange(largest.shape[1], device=device)[None, :] < torch.tensor(
                    [per_row_k[i] for i in limited], device=device)[:, None]
                keep = torch.zeros(len(limited), vocab, dtype=torch.bool, device=device).scatter_(1, largest, within_k)
                logits[rows] = logits[rows].masked_fill(~keep, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nucleus = [i for i, r in enumerate(requests) if r.params.top_p < 1.0]
            if len(nucleus) == len(requests):
                probs = probs.masked_fill(probs < _nucleus_floor(probs, top_p), 0.0)
            elif nucleus:
                rows = torch.tensor(nucleus, device=device)
                floors = torch.zeros_like(top_p).index_copy_(0, rows, _nucleus_floor(probs[rows], top_p[rows]))
                probs = probs.masked_fill(probs < floors, 0.0)  # floor 0 (no top-p): nothing
            candidate_ids = torch.arange(vocab, device=device).expand(len(requests), vocab)
        if any(r.params.min_p > 0.0 for r in requests):  # relative to the most likely token
            min_p = torch.tensor([r.params.min_p for r in requests], device=device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        if any(r.params.typical_p < 1.0 for r in requests):
            probs = _typical_filter(probs, torch.tensor([r.params.typical_p for r in requests], device=device))
        return probs, candidate_ids


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(S, 1) column of each row of `probs` (S, K; unnormalised, >= 0, some > 0) where its
    cumulative sum first passes uniform (S, 1, in [0, 1)) times the row's total: column j with
    probability probs[j] / total. Never a column of probability 0 (where rounding makes the target
    reach the total, the last positive column)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    chosen = torch.searchsorted(cdf, uniform * total, right=True)  # cdf[j - 1] <= target < cdf[j]: probs[j] > 0
    # where the cumulative sum first reaches the total, its last step was up: a positive column
    last_positive = torch.searchsorted(cdf, total)
    # (a row with no positive probability, NaN or all zero, still gets a column of the row)
    return torch.minimum(chosen, last_positive).clamp_(max=probs.shape[1] - 1)


NUCLEUS_PREFIX = 256  # on a CPU, top-p's nucleus is looked for among this many largest probabilities first


def _nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(R, 1) the smallest probability top-p keeps in each row of probs (R, V): the smallest prefix
    of the probabilities in descending order whose mass reaches top_p (at least one token). On a
    GPU from a full sort (no host synchronisation); on a CPU from the largest NUCLEUS_PREFIX, then
    8 times more, until the prefix holds every row's nucleus (a peaked distribution's is small)."""
    vocab = probs.shape[-1]
    prefix = vocab if probs.device.type != "cpu" else min(vocab, NUCLEUS_PREFIX)
    while True:
        largest = probs.topk(prefix, dim=-1).values if prefix < vocab else probs.sort(dim=-1, descending=True).values
        mass = largest.cumsum(dim=-1)
        if prefix == vocab or bool((mass[:, -1:] >= top_p).all()):
            break
        prefix = min(vocab, prefix * 8)
    # >= 1: the first token's mass before is 0 (unless top_p is 0 in float32: below its range)
    kept = ((mass - largest) < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
    return largest.gather(1, kept - 1)


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
