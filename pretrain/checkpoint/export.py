"""Checkpoints <-> Hugging Face Llama: consolidate ZeRO shards on CPU, write or read a
`LlamaForCausalLM` directory.

Our parameter names are transformers' minus its leading `model.` (the output projection
`lm_head` sits outside `model.` in both), and RoPE, RMSNorm and GQA use the same layouts, so
the conversion is a rename; tied embeddings drop `lm_head.weight` as transformers expects.
The written directory loads with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` without this package installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import manager

log = logging.getLogger("pretrain")

TOKENIZER_FILE = "tokenizer.json"
LLAMA_TARGET = "pretrain.model.llama.Transformer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def find_checkpoint(run_or_ckpt: Path) -> Path:
    """A complete `step_N` directory: the one given, or a run dir's newest complete one."""
    if manager.is_complete(run_or_ckpt):
        return run_or_ckpt
    if (run_or_ckpt / manager.MARKER).exists() or manager.STEP_DIR.match(run_or_ckpt.name):
        raise FileNotFoundError(
            f"{run_or_ckpt} is not a complete checkpoint (no valid {manager.MARKER}): its save "
            "was interrupted; pick an earlier step_N (tools/inspect_ckpt.py lists them)"
        )
    found = manager.complete_checkpoints(manager.checkpoint_dir(run_or_ckpt))
    if not found:
        raise FileNotFoundError(
            f"{run_or_ckpt} holds no complete checkpoint: give a run dir with "
            "checkpoints/step_N inside, or a step_N directory"
        )
    return found[-1]


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of checkpoint `ckpt`, for any ZeRO stage and world size, on CPU
    (loaded as data only: `manager.safe_loading`)."""
    with manager.safe_loading(ckpt):
        return _consolidated(ckpt)


def _consolidated(ckpt: Path) -> dict[str, torch.Tensor]:
    stage = manager.read_client_state(ckpt)["config"]["deepspeed"]["zero_stage"]
    if stage == 0:  # every rank held everything; rank 0 saved the module whole
        states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)  # fmt: skip
        module = states["module"]
        # With bf16, the fp32 master weights live in the optimizer's flat partitions.
        if next(iter(module.values())).dtype == torch.float32 or not any(
            ckpt.glob("*optim_states.pt")
        ):
            return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float().contiguous() for k, v in state.items()}


def hf_config(model: dict[str, Any], dtype: str, tokenizer: Any | None) -> dict[str, Any]:
    """config.json of a `LlamaForCausalLM` with the shape of our model section `model`."""
    from pretrain.model.llama import LlamaConfig

    fields = {k: v for k, v in model.items() if k in LlamaConfig.__dataclass_fields__}
    cfg = LlamaConfig(**fields)
    ids = _special_ids(tokenizer)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,  # the export drops the tables' padding rows
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
        "use_cache": True,
        **ids,
    }


def _special_ids(tokenizer: Any | None) -> dict[str, int]:
    if tokenizer is None:
        return {}
    ids = {k.replace("_token", "_token_id"): tokenizer.token_to_id(v) for k, v in SPECIALS.items()}
    return {k: v for k, v in ids.items() if v is not None}


VOCAB_TABLES = ("embed_tokens.weight", "lm_head.weight")


def to_hf_names(
    state: dict[str, torch.Tensor], tied: bool, vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """HF parameter names; the vocabulary tables cut to `vocab_size` rows (model.vocab_multiple's
    padding is for our training speed: HF tools would otherwise see ids no tokenizer has)."""
    out = {}
    for k, v in state.items():
        if vocab_size is not None and k in VOCAB_TABLES:
            v = v[:vocab_size]
        out[k if k.startswith("lm_head.") else f"model.{k}"] = v
    if tied:
        out.pop("lm_head.weight", None)
    return out


def export_hf(
    run_or_ckpt: Path, out: Path, dtype: str | None = None, max_shard_size: str = "5GB"
) -> Path:
    """Write checkpoint `run_or_ckpt` (or a run dir's newest) as a HF Llama directory `out`.

    `dtype`: float32 | bfloat16 | float16; default: bfloat16 for runs trained in bf16, else
    float32. The directory appears complete or not at all (written aside, then renamed).
    """
    ckpt = find_checkpoint(run_or_ckpt)
    saved = manager.read_client_state(ckpt)["config"]
    model = saved["model"]
    if model.get("_target_") != LLAMA_TARGET:
        raise ValueError(
            f"{ckpt} holds a {model.get('_target_')} model: only the Llama Transformer "
            "(model=tiny, llama_*) exports to transformers' LlamaForCausalLM"
        )
    if dtype is None:
        dtype = "bfloat16" if saved.get("precision") == "bf16" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    tokenizer = _checkpoint_tokenizer(ckpt)
    if tokenizer is None:
        log.warning("%s carries no tokenizer (synthetic data?): exporting the model only", ckpt)
    write_hf(consolidated_state_dict(ckpt), model, out, dtype, tokenizer, max_shard_size)
    log.info("exported %s -> %s (%s)", ckpt, out, dtype)
    return out


def write_hf(
    state: dict[str, torch.Tensor],
    model: dict[str, Any],
    out: Path,
    dtype: str = "float32",
    tokenizer: Any | None = None,
    max_shard_size: str = "5GB",
) -> None:
    """Write our model's full `state` (our names) and shape `model` as a HF Llama dir `out`.

    Written aside and renamed into place, so `out` is complete or absent.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    config = hf_config(model, dtype, tokenizer)
    state = to_hf_names(state, bool(model.get("tie_embeddings")), config["vocab_size"])
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, tmp / filename, metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        _write_json(tmp / "model.safetensors.index.json", index)
    _write_json(tmp / "config.json", config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if k in config}  # fmt: skip
    _write_json(tmp / "generation_config.json", {**generation, "_from_model_config": True})
    if tokenizer is not None:
        write_tokenizer(tokenizer, tmp, model_max_length=config["max_position_embeddings"])
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_tokenizer(tokenizer: Any, out: Path, model_max_length: int) -> None:
    """The tokenizer as transformers' `PreTrainedTokenizerFast` files."""
    tokenizer.save(str(out / TOKENIZER_FILE))
    specials = {k: v for k, v in SPECIALS.items() if tokenizer.token_to_id(v) is not None}
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            **specials,
        },
    )


def check_same_tokenizer(
    ckpt: Path, saved_sha256: str | None, data_sha256: str | None, allow: bool = False,
    allow_flag: str = "data.allow_tokenizer_change=true", resuming: bool = True,
) -> None:  # fmt: skip
    """Refuse to resume (or, `resuming` false, to evaluate) `ckpt` on data of another
    tokenizer than the run was trained on.

    `saved_sha256` is the fingerprint the checkpoint recorded for its data (older
    checkpoints: that of the tokenizer.json they carry, if any); `data_sha256` that of this
    data (its manifest, or data.tokenizer). `allow` (`allow_flag`) turns the refusal into a
    warning.
    """
    if saved_sha256 is None and (saved := _checkpoint_tokenizer(ckpt)) is not None:
        from pretrain.data.tokenizer import fingerprint

        saved_sha256 = fingerprint(saved)
    if not saved_sha256 or not data_sha256 or saved_sha256 == data_sha256:
        return
    what = (f"{ckpt} was trained on data tokenized by sha256 {saved_sha256[:12]}, but "
            f"{'this run' if resuming else 'the'}'s data was tokenized by sha256 "
            f"{data_sha256[:12]}")  # fmt: skip
    if allow:
        log.warning("%s: going on anyway (%s)", what, allow_flag)
        return
    from pretrain.data.stream import DataError

    afresh = ", or start afresh (checkpoint.resume=none or another run_dir)" if resuming else ""
    raise DataError(
        f"{what}: every token id would mean other text. Use data made with the run's "
        f"tokenizer, or set {allow_flag} if the change is meant{afresh}"
    )


def _checkpoint_tokenizer(ckpt: Path) -> Any | None:
    path = ckpt / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def model_fields_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """Our model section for a transformers Llama config.json (the reverse of hf_config)."""
    if config.get("model_type") != "llama":
        raise ValueError(f"model_type {config.get('model_type')!r}: only Llama models load here")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    heads = config["num_attention_heads"]
    return {
        "_target_": LLAMA_TARGET,
        "n_layers": config["num_hidden_layers"],
        "d_model": config["hidden_size"],
        "n_heads": heads,
        "n_kv_heads": config.get("num_key_value_heads") or heads,
        "ffn_hidden": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "vocab_multiple": 1,  # the tables exactly as they are
        "max_seq_len": config.get("max_position_embeddings", 2048),
        "rope_theta": config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def load_hf_weights(model: torch.nn.Module, hf_dir: Path, model_cfg: dict[str, Any]) -> None:
    """Copy a HF Llama checkpoint's weights into our `model` (model.init_from).

    Refuses a directory whose config.json has another shape than `model_cfg`, naming each
    differing key. Works on ZeRO-3 models too: each parameter is gathered, set, re-sharded.
    """
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.init_from={hf_dir}: no config.json there")
    theirs = json.loads(config_file.read_text())
    rope = theirs.get("rope_parameters") or theirs.get("rope_scaling") or {}
    defaults = {  # transformers' LlamaConfig defaults, for keys a config.json may omit
        "num_key_value_heads": theirs.get("num_attention_heads"),
        "head_dim": theirs.get("hidden_size", 0) // max(theirs.get("num_attention_heads", 1), 1),
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    ours = hf_config(model_cfg, "float32", None)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "rope_theta", "tie_word_embeddings")  # fmt: skip
    diff = [f"{k}: checkpoint has {theirs.get(k, defaults.get(k))!r}, model has {ours[k]!r}"
            for k in keys if theirs.get(k, defaults.get(k)) != ours[k]]  # fmt: skip
    if theirs.get("model_type") != "llama":
        diff.insert(0, f"model_type: {theirs.get('model_type')!r}, not 'llama'")
    if rope.get("rope_type", "default") != "default":
        diff.append(f"RoPE scaling {rope.get('rope_type')!r}: not supported")
    if diff:
        raise ValueError(
            f"model.init_from={hf_dir} does not fit the configured model:\n  "
            + "\n  ".join(diff)
            + "\nSet the model.* fields to the checkpoint's shape."
        )
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.init_from={hf_dir}: no *.safetensors weights there")
    tied = bool(ours["tie_word_embeddings"])
    params = dict(model.named_parameters(remove_duplicate=False))
    import deepspeed
    from safetensors import safe_open

    found: set[str] = set()
    for f in files:  # one tensor at a time: never the whole model in memory twice
        with safe_open(str(f), framework="pt") as weights:
            for hf_name in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                name = hf_name.removeprefix("model.")
                if name not in params:
                    continue
                targets = [name, "lm_head.weight"] if tied and name == "embed_tokens.weight" \
                    else [name]  # fmt: skip
                tensor = weights.get_tensor(hf_name)
                for target in targets:
                    _set_param(params[target], tensor, deepspeed)
                    found.add(target)
    missing = sorted(set(params) - found)
    if missing:
        raise ValueError(f"model.init_from={hf_dir} lacks weights for {missing[:5]}")
    log.info("initialised the model from %s (%d tensors)", hf_dir, len(found))


def _set_param(param: torch.nn.Parameter, value: torch.Tensor, deepspeed: Any) -> None:
    """Set a parameter, also when ZeRO-3 shards it (gathered, set, re-sharded). A vocabulary
    table may have fewer rows than ours (model.vocab_multiple's padding keeps its init)."""
    shape = tuple(getattr(param, "ds_shape", param.shape))
    rows_fit = value.dim() == 2 and value.shape[1:] == shape[1:] and value.shape[0] <= shape[0]
    if tuple(value.shape) != shape and not rows_fit:
        raise ValueError(f"shape {tuple(value.shape)} where the model has {shape}")
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        param[: value.shape[0]].copy_(value.to(param.dtype))  # every rank: ZeRO 0-2 hold all
