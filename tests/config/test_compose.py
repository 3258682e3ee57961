"""Every preset composes and resolves; bad keys, types and combinations fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, conf_dir, deepspeed_config, resolve
from tests.conftest import compose_config, launch


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _presets("model"))
def test_every_model_preset_composes_and_resolves(model: str) -> None:
    run = resolve(compose_config([f"model={model}"]), world_size=1, cuda_available=False)
    assert run.vocab_size == compose_config([f"model={model}"]).model.vocab_size
    assert run.model._target_.startswith("pretrain.model.")


@pytest.mark.parametrize("experiment", _presets("experiment"))
def test_every_experiment_composes_and_resolves(experiment: str, tmp_path, monkeypatch) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    if cfg.model.get("init_from"):  # sft_demo starts from the demo's export: a stand-in
        monkeypatch.chdir(tmp_path)
        (tmp_path / cfg.model.init_from).mkdir(parents=True)
        (tmp_path / cfg.model.init_from / "config.json").write_text("{}")
    # Cluster experiments ask for bf16 and many ranks; resolve them as on an 8-GPU node.
    run = resolve(cfg, world_size=8 if cfg.precision == "bf16" else 1, cuda_available=True)
    ds = deepspeed_config(run)
    assert ds["train_batch_size"] == (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * run.world_size
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_presets_set_their_stage(stage: int) -> None:
    run = resolve(compose_config([f"deepspeed=zero{stage}"]), 1, cuda_available=False)
    assert deepspeed_config(run)["zero_optimization"]["stage"] == stage


def test_precision_auto_is_bf16_on_gpu_fp32_on_cpu() -> None:
    cfg = compose_config()
    assert resolve(cfg, 1, cuda_available=False).precision == "fp32"
    assert resolve(cfg, 1, cuda_available=True).precision == "bf16"
    ds = deepspeed_config(resolve(cfg, 1, cuda_available=True))
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_grad_accum_is_derived_from_global_micro_and_world() -> None:
    cfg = compose_config(["trainer.global_batch_size=32", "trainer.micro_batch_size=2"])
    run = resolve(cfg, world_size=4, cuda_available=False)
    assert run.grad_accum == 4
    assert run.tokens_per_step == 32 * cfg.trainer.seq_len


def test_all_config_errors_are_reported_at_once() -> None:
    cfg = compose_config(
        [
            "trainer.global_batch_size=10",
            "model.n_kv_heads=3",
            "precision=fp16",
            "deepspeed.zero_stage=4",
            "trainer.seq_len=4096",
        ]
    )
    with pytest.raises(ConfigError) as info:
        resolve(cfg, world_size=2, cuda_available=False)
    text = str(info.value)
    for key in (
        "trainer.global_batch_size=10",
        "model.n_kv_heads=3",
        "precision=fp16",
        "deepspeed.zero_stage=4",
        "trainer.seq_len=4096",
    ):
        assert key in text
    assert len(info.value.errors) == 5


def test_offload_needs_the_right_zero_stage() -> None:
    cfg = compose_config(["deepspeed.offload_params=true", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"offload_params=true needs deepspeed\.zero_stage=3"):
        resolve(cfg, 1, cuda_available=False)


def test_compile_under_zero3_needs_the_blocks_as_leaves() -> None:
    ok = ["trainer.compile=true", "deepspeed.zero_stage=3"]
    resolve(compose_config(ok), 1, cuda_available=False)
    assert "keep Block in stage3_leaf_modules" in config_errors(
        [*ok, "deepspeed.stage3_leaf_modules=[MLP]"]
    )
    # The family names its block: qualified by the model's module too; a baseline has none.
    resolve(compose_config([*ok, "deepspeed.stage3_leaf_modules=[pretrain.model.llama.Block]"]),
            1, cuda_available=False)  # fmt: skip
    resolve(compose_config([*ok, "model=lstm", "deepspeed.stage3_leaf_modules=[]"]), 1,
            cuda_available=False)  # fmt: skip


BAD_OVERRIDES = [
    ("trainer.max_stepz=3", "max_stepz"),
    ("optim.lr=fast", "optim.lr"),
    ("model.n_layerz=2", "n_layerz"),
    ("model=no_such_model", "no_such_model"),
]


@pytest.mark.parametrize(("override", "named"), BAD_OVERRIDES)
def test_composing_for_a_tool_names_the_bad_override(override: str, named: str) -> None:
    """The tools (estimate, bench_train) compose in-process: a ConfigError with the reason,
    which they print and exit 2 on, not Hydra's traceback."""
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    message = str(err.value)
    assert named in message and "Traceback" not in message
    assert "+trainer" not in message  # no advice to append a key that the schema lacks
    reasons = {
        "trainer.max_stepz=3": "not in 'TrainerConfig'",
        "optim.lr=fast": "could not be converted to Float",
        "model=no_such_model": "llama_1b",
    }  # the options it could have been
    assert reasons.get(override, named) in message


def test_an_unparsable_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not key=value syntax"):
        compose_config(["trainer.seq_len=[1"])


@pytest.mark.parametrize(("override", "named"), BAD_OVERRIDES)
def test_bad_override_fails_fast_naming_the_key(override: str, named: str) -> None:
    proc = launch([override, "logger.wandb.mode=disabled"], timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr + proc.stdout
    assert "step 1" not in proc.stdout + proc.stderr  # nothing was trained


def test_cross_field_error_exits_2_before_any_model_is_built(tmp_path: Path) -> None:
    proc = launch(["trainer.global_batch_size=7", f"run_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2
    assert "trainer.global_batch_size=7 is not divisible" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("override", "said"),
    [("trainer.max_stepz=3", "Key 'max_stepz' not in 'TrainerConfig'"),
     ("optim.lr=fast", "optim.lr=fast"),
     # Hydra's multirun ran the first job and failed the second (DeepSpeed's groups are
     # per process); it would now end the process after the first: refused up front.
     ("--multirun", "slurm/sweep.sh"),
     ("--multi", "slurm/sweep.sh")],  # argparse's abbreviation, seen only inside Hydra
)  # fmt: skip
def test_an_override_that_does_not_compose_exits_2_with_one_message(
    override: str, said: str, tmp_path: Path
) -> None:
    """The README's own examples of a misspelt key and a wrong type: exit 2 (not Hydra's 1),
    one message naming the override, no traceback, no run dir."""
    proc = launch([override, f"run_dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert said in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_global_batch_can_be_given_in_tokens() -> None:
    cfg = compose_config(
        ["trainer.global_batch_tokens=4096", "trainer.seq_len=256", "trainer.micro_batch_size=4"]
    )
    run = resolve(cfg, world_size=2, cuda_available=False)
    assert run.trainer.global_batch_size == 16 and run.grad_accum == 2
    assert run.tokens_per_step == 4096
    assert deepspeed_config(run)["train_batch_size"] == 16
    assert run.as_dict["trainer"]["global_batch_size"] == 16  # what config.yaml records
    assert run.as_dict["derived"] == {
        "device": "cpu",
        "world_size": 2,
        "parallel": {"data": 2, "sequence": 1, "tensor": 1, "expert": 1},
        "grad_accum": 2,
        "tokens_per_step": 4096,
    }


def test_global_batch_tokens_must_hold_whole_sequences() -> None:
    cfg = compose_config(["trainer.global_batch_tokens=1000", "trainer.seq_len=64"])
    with pytest.raises(ConfigError, match=r"global_batch_tokens=1000 is not a positive multiple"):
        resolve(cfg, world_size=1, cuda_available=False)


def test_checkpoint_and_bad_step_settings_are_checked(tmp_path) -> None:
    cfg = compose_config([
        "trainer.max_bad_steps=0", "checkpoint.every_minutes=-1",
        f"model.init_from={tmp_path / 'nothing'}",
    ])  # fmt: skip
    with pytest.raises(ConfigError) as info:
        resolve(cfg, world_size=1, cuda_available=False)
    text = str(info.value)
    assert "trainer.max_bad_steps=0: must be >= 1" in text
    assert "checkpoint.every_minutes=-1.0: must be >= 0" in text
    assert f"model.init_from={tmp_path / 'nothing'}: no config.json there" in text


def test_wandb_run_id_is_checked() -> None:
    """slurm/pretrain.sh sets logger.wandb.id from the job; W&B rejects some characters."""
    with pytest.raises(ConfigError, match=r"logger\.wandb\.id='a/b': W&B run ids cannot"):
        resolve(compose_config(["logger.wandb.id=a/b"]), world_size=1, cuda_available=False)
    run = resolve(compose_config(["logger.wandb.id=job-12_3"]), world_size=1, cuda_available=False)
    assert run.logger.wandb.id == "job-12_3"


def config_errors(overrides: list[str]) -> str:
    """The ConfigError message that resolving these overrides raises."""
    with pytest.raises(ConfigError) as info:
        resolve(compose_config(overrides), world_size=1, cuda_available=False)
    return str(info.value)


def test_observability_settings_are_checked() -> None:
    text = config_errors([
        "trainer.max_steps=10", "trainer.profile_steps=[5,11]", "logger.progress=fancy",
        "logger.peak_tflops=0", "trainer.eval_every_steps=-1", "logger.wandb.init_timeout_s=0",
    ])  # fmt: skip
    assert "trainer.profile_steps=[5, 11]: give [first, last] optimizer steps with" in text
    assert "logger.progress='fancy': choose auto, bar, lines" in text
    assert "logger.peak_tflops=0.0: must be > 0, or null" in text
    assert "trainer.eval_every_steps=-1: must be >= 0" in text
    assert "logger.wandb.init_timeout_s=0.0: must be > 0" in text
    ok = compose_config(["trainer.profile_steps=[2,3]", "trainer.eval_every_steps=5"])
    assert resolve(ok, world_size=1, cuda_available=False).trainer.profile_steps == [2, 3]
    with pytest.raises(ConfigError, match=r"trainer\.eval_tokens=0: must be >= 1"):
        resolve(compose_config(["trainer.eval_every_steps=5", "trainer.eval_tokens=0"]),
                world_size=1, cuda_available=False)  # fmt: skip


def test_speed_switches_are_checked_and_true_means_full_checkpointing() -> None:
    text = config_errors(["trainer.activation_checkpointing=some", "optim.impl=turbo",
                          "model.loss_impl=fast", "model.vocab_multiple=0"])  # fmt: skip
    assert "trainer.activation_checkpointing='some': choose one of none, full, selective" in text
    assert "optim.impl='turbo': choose one of auto, fused, foreach, loop, cpu_adam" in text
    assert "model.loss_impl='fast': choose one of ('chunked', 'full')" in text
    assert "model.vocab_multiple=0: must be >= 1" in text
    text = config_errors(["optim.impl=cpu_adam"])
    assert "optim.impl=cpu_adam is DeepSpeed's CPU AdamW, for optimizer state offloaded" in text
    assert "set deepspeed.offload_optimizer=true" in text
    for given, policy in [("true", "full"), ("false", "none"), ("selective", "selective")]:
        run = resolve(compose_config([f"trainer.activation_checkpointing={given}"]),
                      world_size=1, cuda_available=False)  # fmt: skip
        assert run.trainer.activation_checkpointing == policy
        assert run.as_dict["trainer"]["activation_checkpointing"] == policy


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("{_target_:nope.Nope}", "trainer.callbacks[0]._target_=nope.Nope: cannot be imported"),
        ("{_target_:pretrain.train.loggers.Loggers}", "is not a subclass of pretrain.train"),
        ("{every:3}", "trainer.callbacks[0]={'every': 3}: give {_target_: module.Class"),
    ],
)
def test_a_callback_that_cannot_be_built_fails_at_start(entry: str, said: str) -> None:
    """trainer.callbacks are checked with the config, before any model is built."""
    assert said in config_errors([f"trainer.callbacks=[{entry}]"])
