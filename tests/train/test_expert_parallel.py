"""Expert parallelism (`parallel.expert`): model=moe_tiny's 8 experts split over 2 ranks (4
each, tokens exchanged all-to-all) trains like one rank holding every expert, at ZeRO 0, 1,
2 and 3: the same losses and gradient norms (within 1e-5), the router's load and aux loss in
every record, the same weights in the checkpoint (read back whole from the ranks that hold
the experts), an exact resume, and an export that transformers reads with our logits. A
layout it cannot move to is refused, naming the fix."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.checkpoint import export, reshard
from pretrain.config import ConfigError, resolve
from pretrain.engine.expert_groups import ExpertCheckpoint
from tests.conftest import (
    EQUIV,
    compose_config,
    curve,
    export_and_compare,
    read_metrics,
    train,
)

pytestmark = pytest.mark.multiprocess

RUN = [*EQUIV, "model=moe_tiny", "checkpoint.every_steps=3"]
EP2 = "parallel.expert=2"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return export.consolidated_state_dict(run_dir / "checkpoints" / "step_6")


def assert_same_curve(records: list[dict], reference: list) -> None:
    """Each step's loss and gradient norm within 1e-5 of the reference curve's."""
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(curve(records), reference,
                                                            strict=True):  # fmt: skip
        assert math.isclose(loss, ref_loss, rel_tol=1e-5), (step, loss, ref_loss)
        assert math.isclose(norm, ref_norm, rel_tol=1e-5), (step, norm, ref_norm)


def assert_same_weights(ours: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def one_rank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("one")
    train(run_dir, [*RUN, "deepspeed.zero_stage=1"])
    return run_dir


@pytest.fixture(scope="module")
def one_rank(one_rank_dir: Path) -> tuple[list, dict]:
    return curve(read_metrics(one_rank_dir)), _weights(one_rank_dir)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_expert_ranks_equal_one_rank_holding_every_expert(
    tmp_path: Path, stage: int, one_rank: tuple[list, dict]
) -> None:
    reference, weights = one_rank
    run = [*RUN, "parallel.expert=2", f"deepspeed.zero_stage={stage}"]
    records = train(tmp_path / "straight", run, nproc=2)
    assert_same_curve(records, reference)
    for r in records:  # the router's figures, as without expert parallelism
        assert 1.0 <= r["moe_aux_loss"] <= 8.0 and 0 <= r["moe_load_min/0"] <= 1 / 8
    ckpt = tmp_path / "straight" / "checkpoints" / "step_6"
    held = torch.load(ckpt / "rank_1.pt", weights_only=False)["experts"]
    assert held["layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # each rank: 4 of 8
    ours = _weights(tmp_path / "straight")
    assert_same_weights(ours, weights)
    if stage in (0, 1, 3):  # stopped at step 3 and resumed: bit for bit
        stopped = tmp_path / "stopped"
        train(stopped, [*run, "trainer.stop_at_step=3"], nproc=2)
        assert curve(train(stopped, run, nproc=2))[3:] == curve(records)[3:]
    if stage == 3:  # the export: every expert, in transformers' per-expert layout
        hf = export_and_compare(tmp_path / "straight", ours, tmp_path / "hf")
        assert hf.config.num_experts == 8


@pytest.mark.slow
def test_four_ranks_in_two_expert_groups_equal_one_rank_and_resume(
    tmp_path: Path, one_rank: tuple[list, dict]
) -> None:
    """4 ranks, parallel.expert=2, ZeRO-2: two expert groups, so each expert is held by 2
    ranks, which ZeRO partitions it over and reduces it between; ranks 2 and 3 hold the
    experts of ranks 0 and 1 without writing them. Equal to one rank; a stop at step 3
    resumes bit for bit."""
    reference, weights = one_rank
    run = [*RUN, "parallel.expert=2", "deepspeed.zero_stage=2"]
    records = train(tmp_path / "straight", run, nproc=4)
    assert_same_curve(records, reference)
    ckpt = tmp_path / "straight" / "checkpoints" / "step_6"
    assert "experts" not in torch.load(ckpt / "rank_2.pt", weights_only=False)
    ours = _weights(tmp_path / "straight")
    assert_same_weights(ours, weights)
    stopped = tmp_path / "stopped"
    train(stopped, [*run, "trainer.stop_at_step=3"], nproc=4)
    assert curve(train(stopped, run, nproc=4))[3:] == curve(records)[3:]


@pytest.mark.parametrize("stage", [1, 3])
def test_expert_and_sequence_parallel_on_four_ranks_equal_one_rank(
    tmp_path: Path, stage: int, one_rank: tuple[list, dict]
) -> None:
    """parallel.expert=2 with parallel.sequence=2 on 4 ranks: each rank holds half the
    experts and a slice of each sequence (DeepSpeed's expert groups of consecutive ranks
    are then the sequence groups, whose tokens reach every expert through the exchange;
    the ranks holding the same experts, 0 and 2, reduce their gradients), and it trains
    like one rank; stopped at step 3, it resumes bit for bit."""
    reference, weights = one_rank
    run = [*RUN, EP2, "parallel.sequence=2", f"deepspeed.zero_stage={stage}"]
    records = train(tmp_path / "straight", run, nproc=4)
    assert_same_curve(records, reference)
    assert_same_weights(_weights(tmp_path / "straight"), weights)
    if stage == 1:
        stopped = tmp_path / "stopped"
        train(stopped, [*run, "trainer.stop_at_step=3"], nproc=4)
        assert curve(train(stopped, run, nproc=4))[3:] == curve(records)[3:]


# A stopped run in one layout, resumed in another: (overrides, ranks) before and after.
LAYOUT_CHANGES = [
    pytest.param(([EP2, "deepspeed.zero_stage=1"], 2), (["deepspeed.zero_stage=1"], 1),
                 id="out-of-expert-parallelism-on-1-rank"),
    pytest.param(([EP2, "deepspeed.zero_stage=3"], 2), ([EP2, "deepspeed.zero_stage=0"], 2),
                 id="zero3-to-zero0"),
    pytest.param((["deepspeed.zero_stage=1"], 2), ([EP2, "deepspeed.zero_stage=3"], 2),
                 id="into-expert-parallelism-via-universal"),
    pytest.param(([EP2, "deepspeed.zero_stage=2"], 4), (["parallel.expert=4",
                                                         "deepspeed.zero_stage=2"], 4),
                 id="expert-2-to-4", marks=pytest.mark.slow),
    pytest.param(([EP2, "deepspeed.zero_stage=0"], 2), (["deepspeed.zero_stage=3"], 1),
                 id="zero0-to-zero3-on-1-rank", marks=pytest.mark.slow),
    pytest.param(([EP2, "parallel.sequence=2", "deepspeed.zero_stage=1"], 4),
                 ([EP2, "deepspeed.zero_stage=2"], 2),
                 id="out-of-sequence-parallelism", marks=pytest.mark.slow),
]  # fmt: skip

# With bias balancing: the router's bias (a buffer) must move with the weights.
BIASED = [*RUN, "model.router_bias_rate=0.01"]


@pytest.fixture(scope="module")
def one_rank_biased(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, dict]:
    run_dir = tmp_path_factory.mktemp("one-biased")
    return curve(train(run_dir, [*BIASED, "deepspeed.zero_stage=1"])), _weights(run_dir)


@pytest.mark.parametrize(("before", "after"), LAYOUT_CHANGES)
def test_a_run_resumes_in_another_expert_layout(
    tmp_path: Path, before: tuple, after: tuple, one_rank_biased: tuple[list, dict]
) -> None:
    """Stopped at step 3 in one layout and resumed in another (parallel.expert, ranks and
    ZeRO stage changed together): every weight, the router bias, the Adam moments and step,
    and the LR schedule's position carry over, so steps 4-6 and the final weights equal one
    rank's within 1e-5."""
    reference, weights = one_rank_biased
    (old, old_ranks), (new, new_ranks) = before, after
    train(tmp_path, [*BIASED, *old, "trainer.stop_at_step=3"], nproc=old_ranks)
    records = train(tmp_path, [*BIASED, *new], nproc=new_ranks)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert_same_curve(records[3:], reference[3:])
    assert_same_weights(_weights(tmp_path), weights)
    biases = [v for k, v in weights.items() if k.endswith("mlp.gate.bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # it moved, and carried over


@pytest.mark.slow
def test_a_resume_onto_three_zero3_ranks_sets_padded_partitions(tmp_path: Path) -> None:
    """Onto 3 ranks at ZeRO-3 with no parameter kept whole between steps: the partitions
    of every parameter whose size 3 does not divide end in padding, which the layout-free
    load must skip; equal to one rank (global batch 12, which 1, 2 and 3 ranks divide)."""
    run = [*BIASED, "trainer.global_batch_size=12"]
    reference = curve(train(tmp_path / "one", [*run, "deepspeed.zero_stage=1"]))
    moved = tmp_path / "moved"
    train(moved, [*run, EP2, "deepspeed.zero_stage=1", "trainer.stop_at_step=3"], nproc=2)
    records = train(moved, [*run, "deepspeed.zero_stage=3",
                            "deepspeed.stage3_param_persistence_threshold=0"], nproc=3)  # fmt: skip
    assert_same_curve(records[3:], reference[3:])
    # Weights within the noise of 3 ranks' reduction order (a straight 3-rank run is 6e-5
    # from one rank at the embedding's rarely seen rows); a misplaced slice is ~1e-2 off.
    ours, theirs = _weights(moved), _weights(tmp_path / "one")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=2e-4, msg=name)


def test_a_bf16_zero0_run_saves_and_resumes_in_both_layouts(tmp_path: Path) -> None:
    """bf16 at ZeRO-0: DeepSpeed's unfused fp16 optimizer steps fp32 copies of the weights,
    which the layout-free state reads and sets (not the bf16 weights). Stopped at step 3,
    it resumes bit for bit in its own layout, and on 1 rank at ZeRO-1 within bf16's
    reduction-order noise of the straight run."""
    run = [*RUN, "precision=bf16"]
    ep = [*run, EP2, "deepspeed.zero_stage=0"]
    straight = curve(train(tmp_path / "straight", ep, nproc=2))
    stopped = tmp_path / "stopped"
    train(stopped, [*ep, "trainer.stop_at_step=3"], nproc=2)
    moved = tmp_path / "moved"
    shutil.copytree(stopped, moved)
    assert curve(train(stopped, ep, nproc=2))[3:] == straight[3:]
    other = curve(train(moved, [*run, "deepspeed.zero_stage=1"]))
    for (step, loss, _), (_, ref, _) in zip(other[3:], straight[3:], strict=True):
        assert loss == pytest.approx(ref, rel=2e-3), step


def test_what_cannot_move_to_another_expert_layout_is_named(tmp_path: Path) -> None:
    """An expert-parallel checkpoint without its moments (saved before they were kept), and
    a ZeRO-0 one without expert parallelism: refused before any model is built, with the
    layout that resumes it and the way to start afresh from its weights."""
    torch.save({"experts": {}, "dense": {}}, tmp_path / "rank_0.pt")
    with pytest.raises(ConfigError, match="saved before expert-parallel checkpoints kept"):
        reshard.check_layout_free(tmp_path, (2, 1, 2, 1), (1, 1, 1, 1))
    with pytest.raises(ConfigError, match="from ZeRO 1-3 only") as refused:
        reshard.check_layout_free(tmp_path, (2, 0, 1, 1), (2, 0, 2, 1))
    assert "resume with 2 ranks, deepspeed.zero_stage=0, parallel.expert=1 and" in str(
        refused.value
    )
    assert "tools/export_hf.py, then model.init_from" in str(refused.value)


@pytest.fixture(scope="module")
def from_export(one_rank_dir: Path, one_rank: tuple[list, dict]) -> tuple[Path, list]:
    """The one-rank run's export, and 3 steps of one rank started from it."""
    hf = one_rank_dir.parent / f"{one_rank_dir.name}-hf"
    export_and_compare(one_rank_dir, one_rank[1], hf)
    run = [*RUN, f"model.init_from={hf}", "trainer.max_steps=3", "deepspeed.zero_stage=1"]
    return hf, curve(train(one_rank_dir.parent / f"{one_rank_dir.name}-init", run))


@pytest.mark.parametrize(
    ("stage", "ranks"),
    [(1, 2), (3, 2), pytest.param(3, 4, marks=pytest.mark.slow, id="3-4")],
)
def test_init_from_an_export_gives_each_rank_its_experts(
    tmp_path: Path, stage: int, ranks: int, from_export: tuple[Path, list]
) -> None:
    """model.init_from under parallel.expert=2: each rank reads its own experts from the
    directory (ZeRO-3: sets its slice of every parameter, no broadcast; on 4 ranks the
    expert-data group of ranks 1 and 3 lacks rank 0), and the run trains like one rank
    started from the same directory."""
    hf, reference = from_export
    run = [*RUN, f"model.init_from={hf}", "trainer.max_steps=3", EP2,
           f"deepspeed.zero_stage={stage}"]  # fmt: skip
    assert_same_curve(train(tmp_path, run, nproc=ranks), reference)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["model=tiny"], 2, "parallel.expert=2: pretrain.model.llama.Transformer has no experts"),
        (["model=moe_tiny", "model.n_experts=5"], 2, "model.n_experts=5 is not divisible by"),
        (["model=moe_tiny"], 3, "parallel.expert=2 must divide the data-parallel size 3"),
        (
            ["model=moe_tiny", "parallel.sequence=2", "model.capacity_factor=1.25"],
            4,
            "model.capacity_factor with parallel.sequence=2",
        ),
    ],
)
def test_what_cannot_split_its_experts_is_named(
    overrides: list[str], world: int, message: str
) -> None:
    cfg = compose_config([*overrides, "parallel.expert=2", "trainer.global_batch_size=24"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(cfg, world_size=world, cuda_available=False)


def test_a_model_without_expert_parallelism_checkpoints_as_before() -> None:
    """No expert parameters: nothing is added to the rank states."""
    engine = SimpleNamespace(module=torch.nn.Linear(2, 2), zero_optimization_stage=lambda: 1)
    assert ExpertCheckpoint(engine).state() == {}
