"""Typed schemas of every config group, registered in Hydra's ConfigStore.

Hydra merges `conf/**/*.yaml` and command-line overrides into these dataclasses, so a
misspelt key (`trainer.max_stepz=3`) or a wrong type (`optim.lr=fast`) fails at compose
time with Hydra's message naming the key, before anything is built. Cross-field checks
(batch divisibility, head counts, precision on this device) live in `resolve.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pretrain.model.llama import LlamaConfig
from pretrain.model.moe_model import MoEConfig


@dataclass
class LlamaModelSchema(LlamaConfig):
    """model=tiny|llama_125m|llama_1b|llama_7b|llama_70b."""

    _target_: str = "pretrain.model.llama.Transformer"
    init_from: str | None = None
    """A Hugging Face Llama directory (config.json + *.safetensors) to start from instead of
    random weights (continued pretraining); its shape must equal this model's. Ignored when
    resuming from a checkpoint of this run."""
    keep_zeros: bool = False
    """The linear layers' weights that are zero when training starts (a pruned model's,
    model.init_from) get no gradient, so they stay zero (tools/prune.py --finetune-steps;
    ZeRO 0-2)."""


@dataclass
class MoEModelSchema(MoEConfig):
    """model=moe_tiny|moe_1b|olmoe_1b_7b|qwen3_30b_a3b: the sparse Llama
    (model/moe_model.py)."""

    _target_: str = "pretrain.model.moe_model.MoETransformer"
    init_from: str | None = None
    """A Hugging Face Qwen3-MoE, OLMoE or Mixtral directory to start from (its shape must
    equal this model's, model.qk_norm choosing the family: model/moe_hf.py)."""
    keep_zeros: bool = False
    """The linear layers' weights that are zero when training starts (a pruned model's,
    model.init_from) get no gradient, so they stay zero (tools/prune.py --finetune-steps;
    ZeRO 0-2)."""


@dataclass
class LSTMModelSchema:
    """model=lstm: embedding -> LSTM -> linear (the seeds' recurrent baseline)."""

    _target_: str = "pretrain.model.baselines.LSTMLM"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = False
    max_seq_len: int = 2048


@dataclass
class TransformerEncoderModelSchema:
    """model=transformer_encoder: causal nn.TransformerEncoder LM (the seeds' baseline)."""

    _target_: str = "pretrain.model.baselines.TransformerEncoderLM"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int = 256
    dropout: float = 0.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False


@dataclass
class SyntheticDataSchema:
    """data=synthetic: deterministic learnable token stream (no I/O); see data/synthetic.py."""

    _target_: str = "pretrain.data.synthetic.synthetic_source"
    noise: float = 0.1
    """Probability that the walk restarts at a random token; sets the loss floor."""


@dataclass
class DataSource:
    """One of several shard sets mixed by weight (data.sources)."""

    path: str = MISSING
    weight: float = 1.0
    """Relative share of training windows drawn from this source."""


@dataclass
class ShardsDataSchema:
    """data=shards: token shards written by tools/prepare_data.py (see data/stream.py)."""

    _target_: str = "pretrain.data.stream.shards_source"
    path: str | None = None
    """A directory with manifest.json, a glob, a brace pattern, or http(s):// / pipe: URLs."""
    sources: list[DataSource] = field(default_factory=list)
    """Instead of path: [{path: ..., weight: 0.7}, {path: ..., weight: 0.3}], mixed by weight."""
    split: str = "train"
    """Which split of a manifest directory to read: train | val."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""
    prefetch_factor: int = 4
    """Micro-batches each worker keeps ready."""
    epochs: int | None = None
    """Stop after this many passes over the data; null streams forever."""
    on_corrupt: str = "error"
    """error: stop at a corrupt shard, naming it | skip: log it, count it, and go on."""
    shuffle_windows: int = 512
    """Shuffle training windows within blocks of this many (resumable: no buffer is lost)."""
    chunk_batches: int = 8
    """Micro-batches a worker sends at once: one transfer per chunk, not per micro-batch."""
    tokenizer: str | None = None
    """Optional tokenizer.json the shards must have been made with (checked at start)."""
    allow_tokenizer_change: bool = False
    """Resume a checkpoint on shards of another tokenizer than it was trained on (or mix
    sources of different tokenizers). Off: refused, since every token id would mean other
    text; on: warned about (e.g. continued pretraining after a vocabulary change)."""


@dataclass
class DemoDataSchema:
    """data=demo: the Python standard library's own sources, tokenized on first use."""

    _target_: str = "pretrain.data.corpus.demo_source"
    cache_dir: str = "${oc.env:PRETRAIN_DATA_DIR,'~/.cache/pretrain'}/demo"
    """Where the demo tokenizer and shards are cached (PRETRAIN_DATA_DIR moves it)."""
    tokenizer_vocab_size: int = 510
    """Size of the BPE trained on the corpus; model.vocab_size must be at least this. 510:
    model=tiny's 512 rows hold it and the two tokens a chat template adds (sft_demo)."""
    max_bytes: int = 4_000_000
    """How much source text to take (sorted by path): ~2M tokens."""
    num_workers: int = 0
    """DataLoader workers per rank (the demo is small: in-process reading is enough)."""


@dataclass
class SftDataSchema:
    """data=sft: conversations for supervised fine-tuning, the loss on the assistant's
    tokens only (see data/sft.py)."""

    _target_: str = "pretrain.data.sft.sft_source"
    path: str = MISSING
    """A .jsonl(.gz/.zst) or .parquet file of conversations, a directory of them, or `demo`
    (the set pretrain/data/chat_demo.py makes from the standard library)."""
    tokenizer: str | None = None
    """A tokenizer.json, a directory holding one, or bytes; default: model.init_from's."""
    chat_template: str | None = None
    """A Jinja chat template file; default: the tokenizer directory's own, else ChatML
    (data/chat.py), whose two special tokens are added to the tokenizer."""
    val_fraction: float = 0.05
    """The share of conversations held out (by a hash of their content) as the val split."""
    val_path: str | None = None
    """Held-out conversations of their own instead (all of data.path then trains)."""
    pack: bool | None = None
    """Several conversations per window, each a document of its own; null: when the model
    masks attention between documents (model.document_mask)."""
    cache_dir: str = "${oc.env:PRETRAIN_DATA_DIR,'~/.cache/pretrain'}/sft"
    """Where a tokenizer extended by the template's tokens, and the demo set, are written."""
    on_bad_record: str = "error"
    """A record that is not a conversation: error (naming it) | skip (counted)."""
    allow_tokenizer_change: bool = False
    """Resume a checkpoint on conversations tokenized otherwise (warned about)."""
    assistant_only: bool = True
    """The loss on the assistant's tokens only; false: on every token but the padding."""


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay to a floor."""

    lr: float = 3e-4
    """Peak learning rate, reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr * min_lr_ratio at trainer.max_steps (Chinchilla used 0.1)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from lr / warmup_steps. The default is a tenth of the
    default trainer.max_steps (100); the experiment presets set their own (2000 at scale). A
    warmup at or past trainer.max_steps is warned about at start."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases or embeddings."""
    beta1: float = 0.9
    beta2: float = 0.95
    """0.95 rather than Adam's 0.999: steadier for large-batch LM pretraining (GPT-3, Llama)."""
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    impl: str = "auto"
    """AdamW kernel: fused (torch's, one kernel for all parameters) | foreach (torch's, a few
    kernels per parameter group) | loop (torch's, one parameter at a time) | auto (fused, on
    GPU and CPU alike, offloaded state included) | cpu_adam (DeepSpeedCPUAdam, JIT-built on
    first use; with deepspeed.offload_optimizer=true only)."""


@dataclass
class DeepSpeedConfig:
    """ZeRO sharding, offload and communication knobs; precision and batch come from elsewhere."""

    zero_stage: int = 0
    """0: plain data parallel; 1: shard optimizer state; 2: + gradients; 3: + parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state on CPU (ZeRO >= 1), stepped there by optim.impl's AdamW."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO-3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass (ZeRO >= 1)."""
    contiguous_gradients: bool = True
    """Copy gradients into one buffer as they are produced, avoiding fragmentation."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduce-scatter/all-reduce bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket (ZeRO 1/2)."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (ZeRO-3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay whole on every rank (ZeRO-3): norms, small biases."""
    stage3_leaf_modules: list[str] = field(default_factory=lambda: ["Block"])
    """Module classes (name or module.Class) whose parameters ZeRO-3 gathers all at once on
    entering them, with no hooks on their children: one fetch per Transformer block, as FSDP
    wraps per block, instead of one per linear layer. [] gathers per submodule."""
    stage3_memory_efficient_linear: bool = False
    """DeepSpeed's own linear function under ZeRO-3 (its `memory_efficient_linear`), which it
    installs as torch.nn.functional.linear for the whole process, for every model built after
    (baselines too). Off: torch's linear, which keeps no more here (weights are already
    in the compute dtype, no autocast copy) and needs no Python autograd Function per call."""


@dataclass
class ParallelConfig:
    """How the ranks split the work beyond data parallelism (config/parallel.py)."""

    sequence: int = 1
    """DeepSpeed-Ulysses sequence parallelism: groups of this many ranks split each sequence
    (seq_len / sequence tokens each) and exchange attention heads around attention; the
    data-parallel size is the world size / sequence. 1: off."""
    expert: int = 1
    """Expert parallelism for mixture-of-experts models: groups of this many consecutive
    data-parallel ranks each hold n_experts / expert of every sparse block's experts, and
    send each token to the rank holding its experts and back (all-to-all). The other
    weights stay under ZeRO over all ranks; the experts under ZeRO over the ranks holding
    the same ones. 1: every rank holds every expert."""


@dataclass
class TrainerConfig:
    """What the loop runs: length, batch geometry, seed, logging cadence."""

    max_steps: int = 100
    """Optimizer steps to run (steps are numbered from 1)."""
    seed: int = 1234
    """Seeds model init and data order; the same seed gives the same run."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks = micro * grad_accum * world_size."""
    global_batch_tokens: int | None = None
    """Tokens per optimizer step; when set, global_batch_size = global_batch_tokens / seq_len."""
    micro_batch_size: int = 4
    """Sequences per rank per forward/backward; grad_accum is derived from it."""
    seq_len: int = 64
    """Tokens per training sequence (the model sees seq_len, predicts the next seq_len)."""
    log_every: int = 10
    """Print one console line every this many steps (metrics.jsonl gets every step)."""
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda."""
    compile: bool = False
    """torch.compile each Transformer block in place: fuses RMSNorm, RoPE and SwiGLU's
    pointwise ops into a few kernels (+9% to +41% tokens/s on an H100 at ZeRO-0), and the
    chunked loss's softmax gradient. Under ZeRO-3 it needs the blocks as ZeRO-3 leaves
    (deepspeed.stage3_leaf_modules, the default)."""
    stop_at_step: int | None = None
    """Stop after this step as a time-boxed job would (the LR schedule still runs to max_steps);
    null runs to max_steps."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them, per Transformer block:
    none | full (keep each block's input only: ~1/3 more compute, the least memory) |
    selective (keep matmul and attention outputs, recompute norms, RoPE and SwiGLU's
    pointwise ops: a few % more time, about half the activation memory). true = full."""
    hang_timeout_s: float = 300.0
    """A rank with no progress for this many seconds in a training step (a hung collective,
    stuck I/O) ends the job with exit code 5, naming every rank's last step and phase, so
    the launcher stops the others (0: never). Checkpoint saves, evaluations and the first
    step of each start (compilation) are not bounded by it; the process group's own
    timeout, which bounds every collective, is this plus 120 s. See
    pretrain/train/watchdog.py."""
    max_bad_steps: int = 5
    """A step whose loss is NaN/Inf on any rank is skipped (no update) and counted; this many
    in a row stop the run (exit code 3) without saving over the last good checkpoint."""
    eval_every_steps: int = 0
    """Score the held-out split every this many optimizer steps and at the job's last step
    (val_loss, val_ppl in metrics.jsonl and W&B); 0: never."""
    eval_tokens: int = 131_072
    """Tokens per evaluation, over all ranks (rounded up to whole micro-batches per rank); the
    same tokens every time, so evaluations compare like with like."""
    eval_data: dict[str, str] = field(default_factory=dict)
    """More named held-out sets, scored at each evaluation beside the data's val split:
    {name: a tools/prepare_data.py directory (its val split) or a glob of shards (all of
    them)}; logged as val_<name>_loss, val_<name>_ppl, val_<name>_bpb."""
    early_stopping_patience: int = 0
    """Stop (saving, exit 0) after this many evaluations in a row without val_loss improving
    by more than early_stopping_min_delta; 0: never. A resumed run stays stopped."""
    early_stopping_min_delta: float = 0.0
    """How much lower than the best so far val_loss must be to count as an improvement."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: trace optimizer steps first..last with torch.profiler into
    <run_dir>/profile/ (Chrome/Perfetto JSON, one file per rank); [] profiles nothing.
    Skip the first steps: they hold compilation and allocator warm-up."""
    profile_memory: bool = False
    """With profile_steps on CUDA: also dump a CUDA memory snapshot of those steps
    (<run_dir>/profile/*_memory.pickle, for https://pytorch.org/memory_viz)."""
    callbacks: list[Any] = field(default_factory=list)
    """More side effects of training: [{_target_: my.module.MyCallback, <its arguments>}],
    each a pretrain.train.callbacks.Callback subclass (checked at start), instantiated by
    Hydra. They come after the run's figures and evaluation and before its logging, saving
    and export: what they add to a step's record is logged."""

    @property
    def last_step(self) -> int:
        """The step this job ends at: max_steps, or stop_at_step when earlier."""
        return (
            self.max_steps if self.stop_at_step is None else min(self.stop_at_step, self.max_steps)
        )


@dataclass
class WandbConfig:
    """Weights & Biases run settings (rank 0 only)."""

    mode: str = "disabled"
    """online | offline | disabled."""
    project: str = "pretrain"
    entity: str | None = None
    name: str | None = None
    """Run name; null uses the config's run_name."""
    id: str | None = None
    """Run id (unique in the project); null: a new one. A resumed run keeps the id its
    checkpoint carries; slurm/pretrain.sh sets this from the job, so a requeued job
    continues its W&B run even when it stopped before its first checkpoint."""
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    """Where W&B writes its files; null means the run dir."""
    init_timeout_s: float = 90.0
    """How long `online` may take to reach the server before the run logs offline instead."""
    log_checkpoints: bool = False
    """Record each checkpoint as a W&B model artifact that *references* its directory
    (file:// path, nothing uploaded), with aliases step_N and latest."""


@dataclass
class LoggerConfig:
    """Console, metrics.jsonl and W&B (rank 0 only); see pretrain/train/loggers.py."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: str = "auto"
    """Console: bar (a live progress bar) | lines (one line per log interval, for files and
    Slurm logs) | auto (bar when stderr is a terminal, else lines)."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device at the run's precision, for MFU; null looks the GPU up
    in pretrain/model/flops.py (H100 SXM bf16: 989). On CPU, null means no MFU."""


@dataclass
class CheckpointConfig:
    """Crash-safe checkpoints under <run_dir>/checkpoints/step_N and resuming from them."""

    every_steps: int = 0
    """Save every this many optimizer steps; 0: only at the end (save_final) and on a stop
    signal."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (rank 0's clock); 0: off."""
    save_final: bool = True
    """Save once more after the last step (or at trainer.stop_at_step), so a finished run
    always leaves weights to export, evaluate and generate from; false opts out."""
    resume: str = "auto"
    """auto: the newest complete checkpoint in the run dir, if any | none | a step_N path."""
    verify: bool = True
    """Before resuming, check the chosen checkpoint's files against the CRC-32s its
    COMMITTED.json records (the ranks read a share each; the time it took is logged) and fall
    back to the one before on a mismatch, saying why; false loads unchecked."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones deleted); 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, for good; 0: none."""
    export_hf: bool = False
    """At the end, save (if needed) and export the final checkpoint to <run_dir>/hf as a
    transformers LlamaForCausalLM directory (tools/export_hf.py does it for any checkpoint)."""


@dataclass
class Config:
    """The whole run. Groups: model, data, optim, deepspeed, trainer, logger, checkpoint;
    `parallel` is a plain section."""

    model: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "auto"
    """bf16 | fp16 | fp32 | auto (bf16 on GPU, fp32 on CPU)."""
    run_name: str = "default"
    """Names the run; the run dir and the W&B run derive from it."""
    run_dir: str = "runs/${run_name}"
    """Where config.yaml, metrics.jsonl and checkpoints go."""


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent).

    `config_schema` types the fixed groups (optim, deepspeed, trainer, logger, checkpoint)
    through its fields; the model and data presets pick their schema in their own defaults
    list, since each `_target_` takes different fields.
    """
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="llama_schema", node=LlamaModelSchema)
    cs.store(group="model", name="moe_schema", node=MoEModelSchema)
    cs.store(group="model", name="lstm_schema", node=LSTMModelSchema)
    cs.store(group="model", name="transformer_encoder_schema", node=TransformerEncoderModelSchema)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataSchema)
    cs.store(group="data", name="shards_schema", node=ShardsDataSchema)
    cs.store(group="data", name="demo_schema", node=DemoDataSchema)
    cs.store(group="data", name="sft_schema", node=SftDataSchema)
