"""Monte Carlo tree search decoding: a search over continuations whose value is a score you
choose (`Reward`), for tasks where the most likely next token leads somewhere poor.

Each simulation walks the tree from the prompt by PUCT (AlphaZero's rule: a child's mean
value plus `c_puct` x its prior x sqrt(parent visits) / (1 + its visits), the prior being the
model's probability of its token; a child not visited yet counts its parent's mean),
expands the leaf it reaches (one model step: its children are its `width` most likely next
tokens), rolls out greedily from it for up to `rollout_tokens` tokens (0: to a stop token
or `max_new_tokens`), scores the whole continuation with the reward, and adds that value to
every node on the way back. The answer is the highest-scoring complete continuation any
simulation produced (one that ended at a stop token or at `max_new_tokens`); when rollouts
are cut short and none is complete, the most visited path, finished greedily.

The KV cache is reused along the tree: each expanded node keeps the decoder's state after
its token (`ForkingDecoder.snapshot`: the cache of its whole prefix), so a child costs one
model step from its parent's state and a rollout continues from its leaf's. Memory grows
with the expanded nodes, at most `simulations` of them, each one row's cache.

Deterministic: no sampling; ties go to the more probable token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class ForkingDecoder(Protocol):
    """A one-row decoder (eval/generate.py `KVDecoder`) whose state can be kept and taken up
    again."""

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits (1, V) after the prompt (one prompt)."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token (1,); logits (1, V) after it."""
        ...

    def snapshot(self) -> Any:
        """A copy of the decoder's state (the cache so far), for `restore`."""
        ...

    def restore(self, state: Any) -> None:
        """Continue from a copy of `state` (the state itself stays as it was)."""
        ...


class Reward(Protocol):
    """The value of a continuation: higher is better."""

    def __call__(self, tokens: list[int], logprobs: list[float]) -> float:
        """`tokens`: the generated tokens (no stop token); `logprobs`: the model's log
        probability of each generated token, the stop token's last when one ended it."""
        ...


@dataclass(frozen=True)
class LogProbReward:
    """The model's log-probability of the continuation, divided by its length **
    `length_penalty` (beam search's score; 1: the mean per token)."""

    length_penalty: float = 1.0

    def __call__(self, tokens: list[int], logprobs: list[float]) -> float:
        return sum(logprobs) / max(len(logprobs), 1) ** self.length_penalty


@dataclass(frozen=True)
class ChrfReward:
    """chrF (sacrebleu, 0-1) of the decoded continuation against a reference text."""

    decode: Any
    """tokens -> text (the tokenizer's decode)."""
    reference: str

    def __call__(self, tokens: list[int], logprobs: list[float]) -> float:
        from sacrebleu.metrics import CHRF

        return CHRF().sentence_score(self.decode(tokens), [self.reference]).score / 100


@dataclass
class Node:
    """A continuation prefix: the token it appends, and the search's figures for it."""

    token: int
    prior: float
    logprob: float
    parent: Node | None
    depth: int
    """Generated tokens up to and including this one."""
    terminal: bool = False
    """A stop token, or the last allowed token: no continuation."""
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    state: Any = None
    """The decoder's state after this token (None until expanded)."""
    logits: torch.Tensor | None = None

    def path(self) -> list[Node]:
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def mean(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def score(self, c_puct: float, parent: Node) -> float:
        """PUCT. A child not visited yet is valued at its parent's mean (first-play value),
        not 0: with rewards below 0 (log-probabilities), 0 would have every unvisited child,
        however unlikely, tried once before any visited one is tried again."""
        q = self.mean() if self.visits else parent.mean()
        return q + c_puct * self.prior * math.sqrt(parent.visits) / (1 + self.visits)


@dataclass(frozen=True)
class SearchConfig:
    """The tree search's settings (GenerationConfig holds them for the CLIs)."""

    simulations: int
    max_new_tokens: int
    c_puct: float = 1.0
    rollout_tokens: int = 0
    """Greedy tokens each rollout adds at most (0: until it ends)."""
    width: int = 8
    """Children per expanded node: its most likely next tokens."""
    stop_tokens: tuple[int, ...] = ()


class TreeSearch:
    """MCTS decoding of one prompt (module docstring)."""

    def __init__(self, decoder: ForkingDecoder, cfg: SearchConfig, reward: Reward) -> None:
        self.decoder, self.cfg, self.reward = decoder, cfg, reward
        self.best: tuple[float, list[int]] | None = None

    def run(self, prompt: list[int]) -> list[int]:
        """The best continuation of `prompt` found in `cfg.simulations` simulations."""
        root = Node(token=-1, prior=1.0, logprob=0.0, parent=None, depth=0)
        root.logits = self.decoder.prefill([prompt])[0]
        self.device = root.logits.device
        root.state = self.decoder.snapshot()
        self._add_children(root)
        for _ in range(self.cfg.simulations):
            node = root
            while node.children and not node.terminal:
                node = max(node.children, key=lambda c: c.score(self.cfg.c_puct, node))
            if not node.terminal and node.state is None:
                self._expand(node)
            self._backup(node, self._evaluate(node))
        if self.best is not None:
            return self.best[1]
        return self._most_visited(root)

    def _expand(self, node: Node) -> None:
        """One model step from the parent's state: this node's logits, state and children."""
        assert node.parent is not None and node.parent.state is not None
        self.decoder.restore(node.parent.state)
        node.logits = self.decoder.step(torch.tensor([node.token], device=self.device))[0]
        node.state = self.decoder.snapshot()
        self._add_children(node)

    def _add_children(self, node: Node) -> None:
        assert node.logits is not None
        logp = F.log_softmax(node.logits.float(), dim=-1)
        top = torch.topk(logp, min(self.cfg.width, logp.numel()))
        depth = node.depth + 1
        for lp, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            ends = token in self.cfg.stop_tokens or depth == self.cfg.max_new_tokens
            node.children.append(Node(token, math.exp(lp), lp, node, depth, terminal=ends))

    def _evaluate(self, node: Node) -> float:
        """The reward of the node's path continued greedily (a rollout), noting it when it
        is complete and the best so far."""
        path = node.path()
        tokens = [n.token for n in path]
        logprobs = [n.logprob for n in path]
        complete = node.terminal
        if not node.terminal:
            extra, extra_lp, complete = self._rollout(node, self.cfg.rollout_tokens)
            tokens, logprobs = tokens + extra, logprobs + extra_lp
        if tokens and tokens[-1] in self.cfg.stop_tokens:
            tokens = tokens[:-1]
        value = self.reward(tokens, logprobs)
        if complete and (self.best is None or value > self.best[0]):
            self.best = (value, tokens)
        return value

    def _rollout(self, node: Node, limit: int) -> tuple[list[int], list[float], bool]:
        """Greedy tokens after `node` (from its state), at most `limit` (0: until the end):
        (tokens, their log-probabilities, whether the continuation ended)."""
        assert node.logits is not None and node.state is not None
        left = self.cfg.max_new_tokens - node.depth
        budget = left if limit <= 0 else min(left, limit)
        tokens: list[int] = []
        logprobs: list[float] = []
        logits = node.logits
        for i in range(budget):
            logp = F.log_softmax(logits.float(), dim=-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            if token in self.cfg.stop_tokens:
                return tokens, logprobs, True
            if i == budget - 1:
                break
            if i == 0:
                self.decoder.restore(node.state)
            logits = self.decoder.step(torch.tensor([token], device=self.device))[0]
        return tokens, logprobs, len(tokens) == left

    @staticmethod
    def _backup(node: Node | None, value: float) -> None:
        while node is not None:
            node.visits += 1
            node.value_sum += value
            node = node.parent

    def _most_visited(self, root: Node) -> list[int]:
        """The most visited path from the root, then greedy to the end (no rollout was
        complete)."""
        node = root
        while node.children and not node.terminal and any(c.visits for c in node.children):
            node = max(node.children, key=lambda c: (c.visits, c.prior))
        if node.state is None and not node.terminal:
            self._expand(node)
        tokens = [n.token for n in node.path()]
        if not node.terminal:
            tokens += self._rollout(node, 0)[0]
        return [t for t in tokens if t not in self.cfg.stop_tokens]
