"""Text generation with a KV cache: greedy, sampling (temperature, top-k, top-p, repetition
penalty), beam search with a length penalty, and Monte Carlo tree search
(eval/mcts.py), for a batch of prompts of any lengths.

The search functions talk to a `Decoder`: `prefill(prompts)` runs the prompts once and
`step(tokens)` feeds one token per row, each returning the next-token logits. `KVDecoder`
keeps every layer's keys and values (the model's own cache, `CachedLM`), so a new token costs
one position, not the whole prefix. Beam search follows transformers' semantics (the top
2K continuations per step, finished hypotheses scored `sum log p / generated_len **
length_penalty`, its default early-stopping heuristic), so its output equals
`LlamaForCausalLM.generate(num_beams=K)` on the exported model.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pretrain.eval.mcts import LogProbReward, Reward, SearchConfig, TreeSearch

NEG = -1.0e9  # "never": HF's beam search uses the same large negative


@dataclass
class GenerationConfig:
    """How to continue each prompt."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0: all."""
    top_p: float = 1.0
    """Sample only among the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the row (CTRL, Keskar et al. 2019): a logit is
    divided by it when positive, multiplied when negative."""
    num_beams: int = 1
    """> 1: beam search (deterministic; temperature and top-k/p are not used)."""
    length_penalty: float = 1.0
    """Beam search: a finished hypothesis scores sum(log p) / generated_len ** this."""
    stop_tokens: Sequence[int] = field(default_factory=tuple)
    """Token ids that end a row (not included in its output), e.g. the tokenizer's EOS."""
    seed: int | None = None
    """Seeds sampling; None draws from torch's global generator."""
    search: str = "auto"
    """auto: greedy, sampling or beam search as the options above say; mcts: Monte Carlo
    tree search (eval/mcts.py), each prompt on its own."""
    simulations: int = 64
    """MCTS: simulations per prompt (each one model step plus its rollout)."""
    c_puct: float = 1.0
    """MCTS: how much the model's prior drives exploration against the values found."""
    rollout_tokens: int = 0
    """MCTS: greedy tokens each rollout adds at most (0: until the continuation ends)."""
    mcts_width: int = 8
    """MCTS: children per expanded node (its most likely next tokens)."""

    def errors(self) -> list[str]:
        errs = []
        if self.max_new_tokens < 1:
            errs.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            errs.append(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            errs.append(f"top_k={self.top_k}: must be >= 0 (0 keeps all tokens)")
        if not 0 < self.top_p <= 1:
            errs.append(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            errs.append(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 is none)")
        if self.num_beams < 1:
            errs.append(f"num_beams={self.num_beams}: must be >= 1")
        if self.num_beams > 1 and self.temperature > 0:
            errs.append("num_beams > 1 is deterministic beam search: leave temperature at 0")
        return errs + self._search_errors()

    def _search_errors(self) -> list[str]:
        if self.search not in ("auto", "mcts"):
            return [f"search={self.search!r}: choose auto or mcts"]
        if self.search != "mcts":
            return []
        errs = [f"{k}={v}: must be >= {low}" for k, v, low in
                [("simulations", self.simulations, 1), ("c_puct", self.c_puct, 0),
                 ("rollout_tokens", self.rollout_tokens, 0), ("mcts_width", self.mcts_width, 1)]
                if v < low]  # fmt: skip
        if self.num_beams > 1 or self.temperature > 0:
            errs.append("search=mcts is its own deterministic search: leave num_beams at 1 "
                        "and temperature at 0")  # fmt: skip
        return errs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation options the CLIs share (tools/generate.py, tools/eval_generate.py)."""
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument(
        "--stop-token-id",
        type=int,
        action="append",
        default=[],
        help="also stop at this token id (the end-of-text token always stops)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seeds sampling")
    parser.add_argument("--search", choices=("auto", "mcts"), default="auto",
                        help="auto: greedy, sampling or beam search as the options say; mcts: "
                        "Monte Carlo tree search")  # fmt: skip
    parser.add_argument("--simulations", type=int, default=64, help="mcts: per prompt")
    parser.add_argument("--c-puct", type=float, default=1.0, help="mcts: exploration weight")
    parser.add_argument(
        "--rollout-tokens",
        type=int,
        default=0,
        help="mcts: greedy tokens per rollout at most (0: to the end)",
    )
    parser.add_argument(
        "--mcts-width",
        type=int,
        default=8,
        help="mcts: children per node (its most likely next tokens)",
    )


def config_from_args(args: argparse.Namespace, eos: int | None) -> GenerationConfig:
    """GenerationConfig from `add_arguments`' options; `eos` (if any) stops generation."""
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        stop_tokens=[*([eos] if eos is not None else []), *args.stop_token_id], seed=args.seed,
        search=args.search, simulations=args.simulations, c_puct=args.c_puct,
        rollout_tokens=args.rollout_tokens, mcts_width=args.mcts_width,
    )  # fmt: skip


class CachedLM(Protocol):
    """What generation needs of a model: a KV cache of its own (the Llama Transformer's is
    `pretrain.model.llama.KVCache`), fed through forward with each token's position."""

    max_seq_len: int

    def empty_cache(self, rows: int, length: int, device: torch.device, dtype: torch.dtype
                    ) -> Any:  # fmt: skip
        """A cache for `rows` sequences of up to `length` positions, every position real."""
        ...

    def __call__(self, tokens: torch.Tensor, *, cache: Any, positions: torch.Tensor
                 ) -> torch.Tensor:  # fmt: skip
        """Logits (N, T, V) of `tokens` at `positions`, attending to and extending `cache`
        (its `real` mask (N, length) says which positions hold tokens)."""
        ...


class Decoder(Protocol):
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor: ...
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def reorder(self, rows: torch.Tensor) -> None: ...


class KVDecoder:
    """Runs `model` incrementally on left-padded prompts, keeping keys and values cached."""

    def __init__(self, model: CachedLM, max_new_tokens: int) -> None:
        self.model, self.max_new_tokens = model, max_new_tokens
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits (N, V) after each prompt. Prompts are left-padded to one length."""
        width = max(len(p) for p in prompts)
        rows = len(prompts)
        tokens = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        real = torch.zeros(rows, width, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p) :] = torch.tensor(p, device=self.device)
            real[i, width - len(p) :] = True
        length = width + self.max_new_tokens
        self.cache = self.model.empty_cache(rows, length, self.device, self.dtype)
        self.cache.real[:, :width] = real
        self.next_position = real.sum(1)  # (N,) where each row's next token sits
        positions = (real.cumsum(1) - 1).clamp(min=0)  # (N, width): 0, 1, ... from each start
        logits = self.model(tokens, cache=self.cache, positions=positions)
        return logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (N,); logits (N, V) for the token after it."""
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        logits = self.model(tokens[:, None], cache=self.cache, positions=positions)
        return logits[:, -1].float()

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)
        self.next_position = self.next_position.index_select(0, rows)

    def snapshot(self) -> Any:
        """A copy of the state so far (the cache of every position fed), for `restore`."""
        return copy.deepcopy(self.cache), self.next_position.clone()

    def restore(self, state: Any) -> None:
        """Continue from a copy of `snapshot`'s `state` (which stays as it was)."""
        cache, position = state
        self.cache, self.next_position = copy.deepcopy(cache), position.clone()


def penalize_repeats(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (N, V); history (N, L) token ids already in each row (-1: none)."""
    if penalty == 1.0:
        return scores
    ids = history.clamp(min=0)
    seen = torch.gather(scores, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    out = scores.clone()
    out.scatter_(1, ids, seen)
    # -1 entries were clamped onto token 0: put its score back unless 0 really occurs.
    has_zero = (history == 0).any(1)
    out[:, 0] = torch.where(has_zero, out[:, 0], scores[:, 0])
    return out


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set every logit outside the top-k and outside the top-p nucleus to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token once the more likely ones already hold top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def generate(
    model: CachedLM, prompts: list[list[int]], cfg: GenerationConfig,
    decoder: Decoder | None = None, reward: Reward | None = None,
) -> list[list[int]]:  # fmt: skip
    """The new tokens for each prompt (a stop token ends a row and is left out). `reward`:
    what search=mcts maximises (default: the length-normalised log-probability)."""
    errs = cfg.errors()
    if errs:
        raise ValueError("invalid generation settings:\n  " + "\n  ".join(errs))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    if longest > model.max_seq_len:
        raise ValueError(
            f"prompt + max_new_tokens = {longest} tokens exceeds the model's max_seq_len="
            f"{model.max_seq_len}: shorten the prompt or lower max_new_tokens"
        )
    was_training = model.training
    model.eval()
    try:
        if cfg.search == "mcts":
            return [_tree_search(model, p, cfg, reward) for p in prompts]
        if cfg.num_beams > 1:
            return beam_search(prompts, cfg, decoder or KVDecoder(model, cfg.max_new_tokens))
        return sample(prompts, cfg, decoder or KVDecoder(model, cfg.max_new_tokens))
    finally:
        model.train(was_training)


@torch.no_grad()
def mean_logprob(model: CachedLM, prompt: list[int], tokens: list[int]) -> float:
    """The mean per-token log-probability of `tokens` after `prompt` under `model`, by one
    plain forward (0 for no tokens)."""
    if not tokens:
        return 0.0
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(torch.tensor([prompt + tokens[:-1]], device=device))[0].float()
    finally:
        model.train(was_training)
    logp = F.log_softmax(logits[len(prompt) - 1 :], dim=-1)
    return float(logp[torch.arange(len(tokens)), torch.tensor(tokens)].mean())


def _tree_search(
    model: CachedLM, prompt: list[int], cfg: GenerationConfig, reward: Reward | None
) -> list[int]:  # fmt: skip
    search = SearchConfig(cfg.simulations, cfg.max_new_tokens, cfg.c_puct, cfg.rollout_tokens,
                          cfg.mcts_width, tuple(cfg.stop_tokens))  # fmt: skip
    scorer = reward if reward is not None else LogProbReward(cfg.length_penalty)
    return TreeSearch(KVDecoder(model, cfg.max_new_tokens), search, scorer).run(prompt)


def sample(prompts: list[list[int]], cfg: GenerationConfig, decoder: Decoder) -> list[list[int]]:
    """Greedy (temperature 0) or sampled decoding, one token per row per step."""
    logits = decoder.prefill(prompts)
    device = logits.device
    generator = None
    if cfg.seed is not None and cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    history = _history(prompts, cfg.max_new_tokens, device)  # (N, L + max_new), -1 = empty
    width = max(len(p) for p in prompts)
    stop = torch.tensor(list(cfg.stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for t in range(cfg.max_new_tokens):
        scores = penalize_repeats(logits, history, cfg.repetition_penalty)
        if cfg.temperature > 0:
            scores = filter_top_k_top_p(scores / cfg.temperature, cfg.top_k, cfg.top_p)
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
        else:
            token = scores.argmax(-1)
        finished = torch.isin(token, stop) if len(stop) else torch.zeros_like(done)
        for i in torch.nonzero(~done & ~finished).flatten().tolist():
            out[i].append(int(token[i]))
        done |= finished
        history[:, width + t] = torch.where(done, -1, token)
        if bool(done.all()) or t == cfg.max_new_tokens - 1:
            break
        logits = decoder.step(token)
    return out


def _collect_finished(
    best: list[list[tuple[float, list[int]]]], best_scores: torch.Tensor,
    improvable: torch.Tensor, ends: torch.Tensor, seqs: torch.Tensor, parent: torch.Tensor,
    token: torch.Tensor, cand_scores: torch.Tensor, stop: torch.Tensor, norm: float,
) -> None:  # fmt: skip
    """Beam search's finished hypotheses: the continuations among each prompt's top K that
    end, while the prompt can still improve; keeps the K best per prompt (in `best` and
    `best_scores`), scored by summed log-probability / `norm`."""
    n, K = best_scores.shape
    for i in range(n):
        if not improvable[i]:
            continue
        for r in range(K):
            if not ends[i, r]:
                continue
            tokens = seqs[i, parent[i, r]].tolist()
            if not torch.isin(token[i, r], stop):
                tokens.append(int(token[i, r]))
            best[i].append((float(cand_scores[i, r]) / norm, tokens))
        best[i] = sorted(best[i], key=lambda h: -h[0])[:K]
        scores = [s for s, _ in best[i]]
        best_scores[i, : len(best[i])] = torch.tensor(scores, device=best_scores.device)


def beam_search(
    prompts: list[list[int]], cfg: GenerationConfig, decoder: Decoder
) -> list[list[int]]:
    """Beam search with K = num_beams beams per prompt, as transformers runs it.

    Each step keeps the best K running beams out of the top 2K (more with several stop
    tokens) continuations; a continuation that ends (a stop token, or the last allowed
    token) among the top K becomes a finished hypothesis scored sum(log p) /
    generated_len ** length_penalty. A prompt is done when it has K finished hypotheses and
    its best running beam, at its current length, cannot beat the worst of them.
    """
    K, n = cfg.num_beams, len(prompts)
    logits = decoder.prefill([p for p in prompts for _ in range(K)])  # (n*K, V)
    device, V = logits.device, logits.size(-1)
    width = max(len(p) for p in prompts)
    history = _history([p for p in prompts for _ in range(K)], cfg.max_new_tokens, device)
    stop = torch.tensor(list(cfg.stop_tokens), dtype=torch.long, device=device)
    keep = max(2, 1 + len(stop)) * K
    running = torch.zeros(n, K, device=device)
    running[:, 1:] = NEG  # all K rows hold the same prompt: expand only the first
    seqs = torch.zeros(n, K, 0, dtype=torch.long, device=device)  # running beams' new tokens
    best_scores = torch.full((n, K), NEG, device=device)  # finished hypotheses, best first
    best: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    improvable = torch.ones(n, dtype=torch.bool, device=device)
    for t in range(cfg.max_new_tokens):
        log_probs = F.log_softmax(logits, dim=-1)
        log_probs = penalize_repeats(log_probs, history, cfg.repetition_penalty)
        total = (log_probs.view(n, K, V) + running[:, :, None]).view(n, K * V)
        cand_scores, cand = torch.topk(total, keep)  # (n, keep), best first
        parent, token = cand // V, cand % V
        last = t == cfg.max_new_tokens - 1
        ends = torch.isin(token, stop) if len(stop) else torch.zeros_like(token, dtype=torch.bool)
        ends = ends | last
        gen_len = t + 1
        _collect_finished(best, best_scores, improvable, ends, seqs, parent, token, cand_scores,
                          stop, gen_len**cfg.length_penalty)  # fmt: skip
        if last or bool(ends.all()):
            break
        # The next running beams: the best K continuations that did not end.
        alive = cand_scores + ends.float() * NEG
        pick = torch.topk(alive, K).indices  # (n, K)
        running = torch.gather(alive, 1, pick)
        parents = torch.gather(parent, 1, pick)
        chosen = torch.gather(token, 1, pick)
        seqs = torch.cat([torch.gather(seqs, 1, parents[:, :, None].expand_as(seqs)),
                          chosen[:, :, None]], dim=2)  # fmt: skip
        rows = (parents + torch.arange(n, device=device)[:, None] * K).flatten()
        history = history.index_select(0, rows)
        history[:, width + t] = chosen.flatten()
        # Done when K hypotheses are in and the best running beam, even ending now, loses.
        full = torch.tensor([len(b) == K for b in best], device=device)
        can_win = running[:, 0] / (gen_len**cfg.length_penalty) > best_scores[:, -1]
        improvable &= ~full | can_win
        if not bool(improvable.any()):
            break
        decoder.reorder(rows)
        logits = decoder.step(chosen.flatten())
    return [b[0][1] if b else [] for b in best]


def _history(prompts: list[list[int]], extra: int, device: torch.device) -> torch.Tensor:
    """(N, longest prompt + extra) token ids per row, right-aligned prompts, -1 = empty."""
    width = max(len(p) for p in prompts)
    hist = torch.full((len(prompts), width + extra), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        hist[i, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
    return hist
