"""Where a run resumes from, decided before the model is built: the checkpoint
(checkpoint.resume=auto|none|<dir>, verified), whether it fits this run (model shape, the
data's tokenizer), and how it loads in this run's layout (`Route`): another layout's is
converted to DeepSpeed's universal format once, and one that moves experts between ranks
loads through its layout-free state (checkpoint/layout_free.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pretrain.checkpoint import manager as checkpoint
from pretrain.checkpoint import reshard
from pretrain.checkpoint.export import check_same_tokenizer
from pretrain.checkpoint.reshard import Route
from pretrain.config import ConfigError, RunConfig
from pretrain.data.source import DataSource
from pretrain.model.family import family_of


@dataclass(frozen=True)
class ResumePlan:
    """Where a run resumes from, known before the model is built."""

    path: Path | None
    """The checkpoint (None: a fresh start)."""
    saved_layout: tuple[int, int]
    """(world size, ZeRO stage) it was saved with (this run's own when fresh)."""
    route: Route = "same"
    saved_sequence: int = 1
    """The sequence-parallel size it was saved with (this run's own when fresh)."""
    saved_expert: int = 1
    """The `parallel.expert` it was saved with (this run's own when fresh)."""

    @property
    def universal(self) -> bool:
        """It loads through DeepSpeed's universal format (the engine is built for it)."""
        return self.route == "universal"


def plan_resume(run: RunConfig, ckpt_dir: Path, data: DataSource) -> ResumePlan:
    """Pick the checkpoint and check it fits this run (model shape, the data's tokenizer,
    the layout change), converting it for another layout when needed."""
    layout = (run.world_size, run.deepspeed.zero_stage)
    path = resume_path(run, ckpt_dir)
    if path is None or not checkpoint.is_complete(path):
        return ResumePlan(path, layout, "same", run.parallel.sequence, run.parallel.expert)
    client = checkpoint.read_client_state(path)
    check_same_model(client["config"], run, path)
    check_same_tokenizer(path, client.get("data_tokenizer_sha256"), data.tokenizer_sha256,
                         data.allow_tokenizer_change)  # fmt: skip
    saved_layout = reshard.saved_layout(client["config"])
    saved_expert = reshard.saved_expert(client["config"])
    saved_sequence = reshard.saved_sequence(client["config"])
    route = _route(path, (*saved_layout, saved_expert, saved_sequence),
                   (*layout, run.parallel.expert, run.parallel.sequence))  # fmt: skip
    if route == "universal" or (route == "layout_free" and saved_expert == 1):
        reshard.convert(path)
    return ResumePlan(path, saved_layout, route, saved_sequence, saved_expert)


def _route(path: Path, saved: tuple[int, ...], now: tuple[int, ...]) -> Route:
    """How checkpoint `path`, saved with (world size, ZeRO stage, parallel.expert,
    parallel.sequence) `saved`, loads in layout `now`; raises when it cannot."""
    if saved == now:
        return "same"
    if saved[2] > 1 or now[2] > 1:  # even a sequence-parallel change: experts are per rank
        reshard.check_layout_free(path, saved, now)
        return "layout_free"
    if reshard.needs_universal(saved[:2], now[:2], path):
        return "universal"
    return "direct"


def resume_path(run: RunConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: checkpoint.resume=auto|none|<step_N dir>."""
    if run.checkpoint.resume == "none":
        return None
    if run.checkpoint.resume == "auto":
        return checkpoint.choose_resume(ckpt_dir, run.checkpoint.verify)
    path = Path(run.checkpoint.resume)
    problems = (
        checkpoint.verify_timed(path)
        if run.checkpoint.verify and checkpoint.is_complete(path)
        else []
    )
    if problems:
        raise checkpoint.CheckpointError(
            f"checkpoint.resume={path} fails its checksums: {'; '.join(problems)}. Restore it "
            "from a copy, or resume from another checkpoint (checkpoint.verify=false loads it "
            "unchecked)"
        )
    return path


def check_same_model(saved: dict, run: RunConfig, path: Path) -> None:
    """Refuse to resume a checkpoint of another model shape, naming every differing key (the
    family's `shape_keys`; the attention kernel or dropout may differ)."""
    new = run.as_dict["model"]
    family = family_of(new)
    old = family.saved_fields(saved.get("model", {}))
    diff = [f"model.{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}"
            for k in family.shape_keys if k in old and old.get(k) != new.get(k)]  # fmt: skip
    rows = [family.table_rows(m) for m in (old, new)]
    if not diff and rows[0] != rows[1]:
        diff.append(
            f"model.vocab_multiple: checkpoint {old.get('vocab_multiple')!r} ({rows[0]} table "
            f"rows), config {new.get('vocab_multiple')!r} ({rows[1]} rows)"
        )
    if diff:
        raise ConfigError([
            f"{path} holds another model shape ({'; '.join(diff)}): use the checkpoint's "
            "model settings, or checkpoint.resume=none (or another run_dir) to start afresh"
        ])  # fmt: skip
