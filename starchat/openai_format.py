"""OpenAI's log-probability objects, shared by the server and the batch runner's output lines."""

from __future__ import annotations

from starchat.outputs import TokenLogprob


def completion_logprobs(tokens: list[TokenLogprob], offset: int, prompt: dict | None = None) -> dict:
    """OpenAI's completion logprobs, text offsets from `offset`; `prompt`: the echoed prompt's
    entries (the same keys), first."""
    out = {key: list(values) for key, values in (prompt or {}).items()} or \
        {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token in tokens:
        out["text_offset"].append(offset)
        offset += len(token.token)
        out["tokens"].append(token.token)
        out["token_logprobs"].append(token.logprob)
        out["top_logprobs"].append({token.token: token.logprob, **{text: lp for _, text, lp in token.top}})
    return out


def echoed_prompt_logprobs(texts: list[str], scored: list[TokenLogprob | None]) -> dict:
    """An echoed prompt's entries of completion logprobs: each prompt token's text (`texts`) and
    its log-probability given the tokens before it (`scored`; None for the first, as OpenAI's)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for text, entry in zip(texts, scored):
        out["text_offset"].append(offset)
        offset += len(text)
        out["tokens"].append(text)
        out["token_logprobs"].append(entry.logprob if entry else None)
        out["top_logprobs"].append({text: entry.logprob, **{t: lp for _, t, lp in entry.top}} if entry else None)
    return out


def best_of_order(candidates: list[list[TokenLogprob]]) -> list[int]:
    """Indices of `candidates` (each one's tokens with their log-probabilities), best first by
    OpenAI's best_of rule: the highest log-probability per token; equals keep their order."""
    def score(tokens: list[TokenLogprob]) -> float:
        return sum(t.logprob for t in tokens) / len(tokens) if tokens else float("-inf")

    return sorted(range(len(candidates)), key=lambda i: -score(candidates[i]))


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """OpenAI's chat logprobs: each token with its bytes and its top alternatives. The bytes are the
    token's own: a token holding part of a UTF-8 character shows U+FFFD as its text, and its bytes
    joined with its neighbours' give the character."""
    def entry(token: TokenLogprob, token_id: int, text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(token.token_bytes(token_id, text))}

    return {"content": [{**entry(t, t.token_id, t.token, t.logprob),
                         "top_logprobs": [entry(t, token_id, text, lp) for token_id, text, lp in t.top]}
                        for t in tokens]}
