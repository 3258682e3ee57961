"""Monte Carlo tree search decoding (pretrain/eval/mcts.py): on a constructed model whose
greedy path is a trap it finds the highest-scoring continuation of all (checked against
every continuation), deterministically; its KV-cached tree search equals one that reruns
the model on every prefix; chrF against a reference can drive it; bad settings are named."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrain.eval.generate import GenerationConfig, KVDecoder, generate, mean_logprob
from pretrain.eval.mcts import ChrfReward, LogProbReward, Node, SearchConfig, TreeSearch
from pretrain.model import Transformer
from tests.eval.test_generate import NaiveDecoder

V = 6
START, TRAP, GOOD, SURE, EOS = 0, 1, 2, 3, 5


def trap_table() -> torch.Tensor:
    """Next-token log-probabilities by the last token: after START the trap (0.6) is more
    likely than the good token (0.4), but after the trap every token is equally unlikely,
    while after the good token (and its successor) one token is nearly sure."""
    probs = torch.full((V, V), 1.0 / V)
    probs[START] = torch.tensor([0.0, 0.6, 0.4, 0.0, 0.0, 0.0])
    probs[GOOD] = torch.tensor([0.0, 0.0, 0.0, 0.96, 0.02, 0.02])
    probs[SURE] = torch.tensor([0.0, 0.0, 0.0, 0.96, 0.02, 0.02])
    return probs.clamp(min=1e-9).log()


class BigramDecoder:
    """A ForkingDecoder over a bigram table: the logits depend on the last token alone."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.steps = table, 0

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        self.last = prompts[0][-1]
        return self.table[self.last][None]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.last = int(tokens[0])
        return self.table[self.last][None]

    def snapshot(self) -> int:
        return self.last

    def restore(self, state: int) -> None:
        self.last = state


def score_of(tokens: tuple[int, ...], table: torch.Tensor, reward: LogProbReward) -> float:
    logprobs, last = [], START
    for t in tokens:
        logprobs.append(float(table[last, t]))
        last = t
    return reward(list(tokens), logprobs)


def test_it_finds_the_best_continuation_where_greedy_falls_into_the_trap() -> None:
    table, reward = trap_table(), LogProbReward()
    cfg = SearchConfig(simulations=60, max_new_tokens=3, width=V)
    found = TreeSearch(BigramDecoder(table), cfg, reward).run([START])
    best = max(itertools.product(range(V), repeat=3), key=lambda s: score_of(s, table, reward))
    assert found == list(best) == [GOOD, SURE, SURE]
    one = TreeSearch(BigramDecoder(table), SearchConfig(1, 3, width=V), reward).run([START])
    assert one[0] == TRAP  # one simulation is the greedy rollout: the trap
    assert score_of(tuple(one), table, reward) < score_of(best, table, reward) - 0.5
    again = TreeSearch(BigramDecoder(table), cfg, reward).run([START])
    assert again == found  # deterministic: no sampling, ties to the likelier token


def test_a_stop_token_ends_a_continuation_and_is_left_out() -> None:
    table = trap_table()
    table[GOOD] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]).clamp(min=1e-9).log()
    cfg = SearchConfig(simulations=40, max_new_tokens=4, width=V, stop_tokens=(EOS,))
    assert TreeSearch(BigramDecoder(table), cfg, LogProbReward()).run([START]) == [GOOD]


class RecordingSearch(TreeSearch):
    """Keeps the tree it ends with."""

    def _most_visited(self, root: Node) -> list[int]:
        self.root = root
        return super()._most_visited(root)


def test_when_no_rollout_completes_the_most_visited_path_is_finished_greedily() -> None:
    """Rollouts of one token and few simulations never reach max_new_tokens: the answer is
    then the most visited path (more visits, then the likelier token) and greedy after it.
    An unvisited child is valued at its parent's mean, so the tokens the model rules out
    (probability 1e-9) are never tried, where a value of 0, above every log-probability,
    had each tried once (4 of these 12 simulations)."""
    table = trap_table()
    cfg = SearchConfig(simulations=12, max_new_tokens=16, width=V, rollout_tokens=1)
    search = RecordingSearch(BigramDecoder(table), cfg, LogProbReward())
    found = search.run([START])
    assert search.best is None  # nothing complete: the fallback is what answered
    path, node = [], search.root
    while any(c.visits for c in node.children):
        node = max(node.children, key=lambda c: (c.visits, c.prior))
        path.append(node.token)
    assert 1 <= len(path) < cfg.max_new_tokens
    assert search.root.visits == cfg.simulations
    assert {c.token: c.visits for c in search.root.children if c.prior < 1e-6} == dict.fromkeys(
        [START, SURE, 4, EOS], 0
    )
    greedy = []
    for _ in range(cfg.max_new_tokens - len(path)):
        greedy.append(int(table[(greedy or path)[-1]].argmax()))
    assert found == path + greedy


class RerunDecoder(NaiveDecoder):
    """The reference: every step reruns the model on the whole sequence, no cache."""

    def snapshot(self) -> list[list[int]]:
        return [list(r) for r in self.rows]

    def restore(self, state: list[list[int]]) -> None:
        self.rows = [list(r) for r in state]


def test_the_kv_cached_tree_equals_rerunning_the_model(model: Transformer) -> None:
    """Each node continues from its parent's cache (snapshot, restore): the same search and
    values as rerunning the model on every prefix, and the best value is the returned
    continuation's log-probability under a plain forward."""
    cfg = SearchConfig(simulations=24, max_new_tokens=5, width=4, rollout_tokens=2)
    cached = TreeSearch(KVDecoder(model, 5), cfg, LogProbReward())
    rerun = TreeSearch(RerunDecoder(model), cfg, LogProbReward())
    prompt = [5, 9, 2, 7]
    assert cached.run(prompt) == rerun.run(prompt)
    assert cached.best is not None and rerun.best is not None
    assert cached.best[0] == pytest.approx(rerun.best[0], abs=1e-5)
    assert cached.best[0] == pytest.approx(mean_logprob(model, prompt, cached.best[1]), abs=1e-5)


def test_generate_runs_it_per_prompt_and_names_bad_settings(model: Transformer) -> None:
    cfg = GenerationConfig(max_new_tokens=4, search="mcts", simulations=8, mcts_width=3)
    out = generate(model, [[5, 9, 2], [11, 3]], cfg)
    assert [len(o) for o in out] == [4, 4]
    assert out == generate(model, [[5, 9, 2], [11, 3]], cfg)
    bad = GenerationConfig(search="mcts", simulations=0, num_beams=2)
    with pytest.raises(ValueError) as e:
        generate(model, [[1]], bad)
    assert "simulations=0: must be >= 1" in str(e.value)
    assert "leave num_beams at 1" in str(e.value)


def test_chrf_against_a_reference_drives_the_search() -> None:
    """With chrF to the reference "ab" as the value, the search writes it, though the
    model prefers "xx"."""
    table = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]).log().expand(V, V)
    letters = "xyabcd"
    reward = ChrfReward(lambda ids: "".join(letters[i] for i in ids), "ab")
    cfg = SearchConfig(simulations=60, max_new_tokens=2, width=V)
    found = TreeSearch(BigramDecoder(table), cfg, reward).run([START])
    assert "".join(letters[i] for i in found) == "ab"
    greedy = TreeSearch(BigramDecoder(table), SearchConfig(1, 2, width=V), reward).run([START])
    assert greedy == [0, 0] and math.isclose(reward(found, []), 1.0)
