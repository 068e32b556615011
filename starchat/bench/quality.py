"""How far a candidate model (int8 weights) is from its reference (the 16-bit model it was
quantized from), over the same token windows: perplexity, logit drift, greedy agreement.

Logits come from one prefill of each whole window through the engine's model (the path every
prompt takes), so every position is scored; greedy continuations go through `LLM.generate`.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from starchat.llm import LLM
from starchat.tokenizer import Tokenizer
from starchat.model import AttentionMetadata, PrefillChunk
from starchat.sampling_params import SamplingParams


@dataclass
class QualityReport:
    windows: int
    scored_tokens: int
    reference_perplexity: float
    candidate_perplexity: float
    perplexity_ratio: float  # candidate / reference
    mean_kl: float  # KL(reference || candidate) per position, nats
    mean_relative_drift: float  # per position: max |candidate - reference| logit / reference logits' range
    max_relative_drift: float
    top1_agreement: float  # positions whose argmax is the same (teacher-forced)
    greedy_prompts: int
    greedy_new_tokens: int
    greedy_identical: float  # share of prompts whose whole greedy continuation is identical
    greedy_common_prefix: float  # mean tokens before the first difference

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def window_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float32 logits of one window, computed as one prompt chunk. Uses the first
    len(ids) cache slots: call it with no request running."""
    runner = llm.engine.runner
    device, count = runner.device, len(ids)
    metadata = AttentionMetadata(slot_mapping=torch.arange(count, device=device), num_decode_tokens=0,
                                 prefill_chunks=[PrefillChunk(0, count, 0, None)])
    hidden = runner.model(torch.tensor(ids, device=device), torch.arange(count, device=device), metadata, runner.kv_cache)
    return runner.model.compute_logits(hidden).float().cpu()


def compare(reference: LLM, candidate: LLM, windows: list[list[int]], prompt_tokens: int, new_tokens: int) -> QualityReport:
    """Score every window with both models; continue each window's first `prompt_tokens` tokens
    greedily for `new_tokens` with both."""
    nll = {"reference": 0.0, "candidate": 0.0}
    kl_sum = drift_sum = drift_max = 0.0
    agree = positions = 0
    for ids in windows:
        expected, actual = window_logits(reference, ids)[:-1], window_logits(candidate, ids)[:-1]
        targets = torch.tensor(ids[1:])
        log_p, log_q = torch.log_softmax(expected.double(), -1), torch.log_softmax(actual.double(), -1)
        nll["reference"] -= log_p.gather(1, targets[:, None]).sum().item()
        nll["candidate"] -= log_q.gather(1, targets[:, None]).sum().item()
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        span = (expected.amax(-1) - expected.amin(-1)).clamp(min=1e-6)
        drift = (actual - expected).abs().amax(-1) / span
        drift_sum += drift.sum().item()
        drift_max = max(drift_max, drift.max().item())
        agree += (expected.argmax(-1) == actual.argmax(-1)).sum().item()
        positions += len(targets)
    prompts = [ids[:prompt_tokens] for ids in windows]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ours = [c.token_ids for c in reference.generate(prompts, params)]
    theirs = [c.token_ids for c in candidate.generate(prompts, params)]
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in zip(ours, theirs)]
    reference_ppl, candidate_ppl = (math.exp(nll[side] / positions) for side in ("reference", "candidate"))
    return QualityReport(
        windows=len(windows), scored_tokens=positions, reference_perplexity=reference_ppl,
        candidate_perplexity=candidate_ppl, perplexity_ratio=candidate_ppl / reference_ppl,
        mean_kl=kl_sum / positions, mean_relative_drift=drift_sum / positions, max_relative_drift=drift_max,
        top1_agreement=agree / positions, greedy_prompts=len(prompts), greedy_new_tokens=new_tokens,
        greedy_identical=sum(x == y for x, y in zip(ours, theirs)) / len(prompts),
        greedy_common_prefix=sum(prefixes) / len(prefixes))


def stdlib_windows(tokenizer: Tokenizer, count: int, tokens: int) -> tuple[list[list[int]], list[str]]:
    """The first `tokens` tokens of `count` Python standard-library modules (every k-th in name
    order, skipping those shorter than that), and the modules' names: code, the models' domain,
    on every machine that runs the benchmarks."""
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    windows, names = [], []
    for path in modules[::max(1, len(modules) // (2 * count))]:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= tokens:
            windows.append(ids[:tokens])
            names.append(path.name)
        if len(windows) == count:
            break
    return windows, names
