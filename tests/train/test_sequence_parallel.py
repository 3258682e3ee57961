"""Ulysses sequence parallelism (parallel.sequence) against its simplest form: 2 ranks
splitting each sequence train exactly like 1 rank holding it whole, at ZeRO 0-3 and with
grouped-query attention (key/value heads split, or repeated when fewer than the ranks);
per-step losses and gradient norms within 1e-5 (fp32, gloo)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pretrain.checkpoint import export
from tests.conftest import EQUIV, assert_close, export_and_compare, train

pytestmark = pytest.mark.multiprocess


def curves(metrics: list[dict]) -> tuple[list[float], list[float]]:
    return [m["loss"] for m in metrics], [m["grad_norm"] for m in metrics]


# An evaluation at the last step: it changes no step (tested through exact resumes).
EVAL = ["trainer.eval_every_steps=6", "trainer.eval_tokens=256"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[list, list, dict]]:
    """The single-process runs, by model.n_kv_heads (tiny: 4 heads)."""
    runs = {kv: train(tmp_path_factory.mktemp(f"one-{kv}"),
                      [*EQUIV, *EVAL, f"model.n_kv_heads={kv}"])
            for kv in (2, 1)}  # fmt: skip
    return {kv: (*curves(m), m[-1]) for kv, m in runs.items()}


@pytest.mark.parametrize(
    ("stage", "kv_heads"), [(0, 2), (1, 2), (2, 2), (3, 2), (1, 1)],
    ids=["zero0", "zero1", "zero2", "zero3", "zero1-kv-repeated"],
)  # fmt: skip
def test_two_ranks_splitting_each_sequence_equal_one_rank(
    tmp_path: Path, stage: int, kv_heads: int, one_rank: dict[int, tuple[list, list, dict]]
) -> None:
    """tiny's 4 query heads split 2 per rank; its key/value heads split 1 per rank (2), or,
    fewer than the ranks (1), are repeated to one per rank."""
    metrics = train(tmp_path, [*EQUIV, *EVAL, "parallel.sequence=2",
                               f"deepspeed.zero_stage={stage}", f"model.n_kv_heads={kv_heads}"],
                    nproc=2)  # fmt: skip
    losses, norms = curves(metrics)
    assert_close(losses, one_rank[kv_heads][0], rel=1e-5)
    assert_close(norms, one_rank[kv_heads][1], rel=1e-5)
    # The evaluation too: the same loss over the same targets, each counted once (both
    # ranks of the group used to count the whole batch: twice the tokens).
    last, alone = metrics[-1], one_rank[kv_heads][2]
    assert last["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)
    assert last["val_tokens"] == alone["val_tokens"] == 256


def test_a_run_resumes_on_another_sequence_parallel_size(
    tmp_path: Path, one_rank: dict[int, tuple[list, list, dict]]
) -> None:
    """Weights and optimizer state do not depend on parallel.sequence, and the data stream
    continues: saved at step 3 by 2 ranks splitting each sequence, resumed by 1 rank (ZeRO-0,
    loaded directly) and by 2 data-parallel ranks (ZeRO-1, the same shards, the data
    position moved to 2 data ranks)."""
    saved = tmp_path / "saved"
    train(saved, [*EQUIV, "parallel.sequence=2", "checkpoint.every_steps=3",
                  "trainer.stop_at_step=3"], nproc=2)  # fmt: skip
    # Export is unchanged: the checkpoint of a sequence-parallel run is a plain one.
    weights = export.consolidated_state_dict(saved / "checkpoints" / "step_3")
    export_and_compare(saved, weights, tmp_path / "hf")
    alone = tmp_path / "alone"
    shutil.copytree(saved / "checkpoints", alone / "checkpoints")
    metrics = train(alone, EQUIV)
    assert [m["step"] for m in metrics] == [4, 5, 6]
    losses, norms = curves(metrics)
    assert_close(losses, one_rank[2][0][3:], rel=1e-5)
    assert_close(norms, one_rank[2][1][3:], rel=1e-5)

    stage1 = tmp_path / "stage1"
    train(stage1, [*EQUIV, "parallel.sequence=2", "checkpoint.every_steps=3",
                   "trainer.stop_at_step=3", "deepspeed.zero_stage=1"], nproc=2)  # fmt: skip
    resumed = train(stage1, [*EQUIV, "deepspeed.zero_stage=1"], nproc=2)[3:]  # after 1-3
    assert [m["step"] for m in resumed] == [4, 5, 6]
    losses, _ = curves(resumed)
    assert_close(losses, one_rank[2][0][3:], rel=1e-4)  # data parallel sums in another order


@pytest.mark.slow
def test_sequence_groups_compose_with_data_parallelism(tmp_path: Path) -> None:
    """4 ranks as 2 data-parallel groups of 2 sequence ranks equal 2 data-parallel ranks:
    each group takes the data rank's batches, ZeRO-2 shards over all 4."""
    dp = curves(train(tmp_path / "dp", [*EQUIV, "deepspeed.zero_stage=2"], nproc=2))
    both = curves(train(tmp_path / "both", [*EQUIV, "deepspeed.zero_stage=2",
                                            "parallel.sequence=2"], nproc=4))  # fmt: skip
    assert_close(both[0], dp[0], rel=1e-5)
    assert_close(both[1], dp[1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["trainer.activation_checkpointing=selective",
                                    "deepspeed.zero_stage=3"],
                                   ["trainer.compile=true",
                                    "trainer.activation_checkpointing=full"],
                                   ["model.mlp_chunk_tokens=8", "deepspeed.zero_stage=3"]],
                         ids=["checkpointing", "compiled", "tiled-mlp"])  # fmt: skip
def test_with_activation_checkpointing_and_compiled_blocks(
    tmp_path: Path, extra: list[str], one_rank: dict[int, tuple[list, list, dict]]
) -> None:
    """The recompute repeats the exchanges in backward; compiled blocks trace them; a tiled
    MLP (8 of a rank's 2 x 16 tokens at a time) recomputes its pieces under ZeRO-3."""
    losses, _ = curves(train(tmp_path, [*EQUIV, "parallel.sequence=2", *extra], nproc=2))
    assert_close(
        losses, one_rank[2][0], rel=1e-5 if "trainer.compile=true" not in extra else 1e-4
    )  # fmt: skip  (inductor's kernels round differently)


@pytest.fixture(scope="module")
def packed_documents(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Shards of short documents (3-20 bytes, the byte tokenizer), several per window."""
    from pretrain.data import shards

    root = tmp_path_factory.mktemp("documents")
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 20)))
             for _ in range(600)]  # fmt: skip
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    shards.prepare([corpus], "bytes", root / "shards", progress=False)
    return ["data=shards", f"data.path={root / 'shards'}"]


def test_document_masking_splits_over_the_sequence_ranks(
    tmp_path: Path, packed_documents: list[str]
) -> None:
    """The mask is the whole window's: each rank's attention, over the whole sequence after
    the exchange, applies it; positions restart per document across the ranks' slices."""
    masked = [*EQUIV, *packed_documents, "model.document_mask=true",
              "model.document_positions=reset"]  # fmt: skip
    one = curves(train(tmp_path / "one", masked))
    two = curves(train(tmp_path / "two", [*masked, "parallel.sequence=2"], nproc=2))
    assert_close(two[0], one[0], rel=1e-5)
    assert_close(two[1], one[1], rel=1e-5)
    unmasked = curves(train(tmp_path / "unmasked", [*EQUIV, *packed_documents]))
    assert unmasked[0][0] != one[0][0]  # the mask is in the training path
