"""Checkpoints <-> Hugging Face: consolidate ZeRO shards on CPU, write or read a transformers
`*ForCausalLM` directory through the model family's `HFAdapter` (model/family.py; for the
Llama family, LlamaForCausalLM: the conversion is a rename, see model/llama_family.py).

The written directory loads with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` without this package installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import manager
from pretrain.data.chat import CHAT_TEMPLATE_FILE, stop_token_ids
from pretrain.model.family import HFAdapter, family_of, model_fields

log = logging.getLogger("pretrain")

TOKENIZER_FILE = "tokenizer.json"
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
    (loaded as data only: `manager.safe_loading`); an expert-parallel run's experts from
    the ranks that saved them (`full_experts`)."""
    with manager.safe_loading(ckpt):
        derived = manager.read_client_state(ckpt)["config"]["derived"]
        expert = int(derived.get("parallel", {}).get("expert", 1))
        return _expert_parallel(ckpt, expert) if expert > 1 else _consolidated(ckpt)


def _expert_parallel(ckpt: Path, size: int) -> dict[str, torch.Tensor]:
    """The weights of an expert-parallel checkpoint saved with `size` ranks per expert
    group (engine/expert_groups.py `ExpertCheckpoint`): rank 0's dense weights, and each
    expert parameter's shards from the first group's ranks, in expert order."""
    from pretrain.checkpoint.layout_free import ExpertRankFiles

    return ExpertRankFiles(ckpt, size).weights()


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


def _special_ids(tokenizer: Any | None) -> dict[str, int]:
    if tokenizer is None:
        return {}
    ids = {k.replace("_token", "_token_id"): tokenizer.token_to_id(v) for k, v in SPECIALS.items()}
    return {k: v for k, v in ids.items() if v is not None}


def export_hf(
    run_or_ckpt: Path, out: Path, dtype: str | None = None, max_shard_size: str = "5GB"
) -> Path:
    """Write checkpoint `run_or_ckpt` (or a run dir's newest) as a HF directory `out`.

    `dtype`: float32 | bfloat16 | float16; default: bfloat16 for runs trained in bf16, else
    float32. The directory appears complete or not at all (written aside, then renamed).
    """
    ckpt = find_checkpoint(run_or_ckpt)
    saved = manager.read_client_state(ckpt)["config"]
    model = saved["model"]
    if family_of(model).hf is None:
        raise ValueError(
            f"{ckpt} holds a {model.get('_target_')} model, which has no Hugging Face "
            "counterpart: the Llama Transformer (model=tiny, llama_*) exports to "
            "transformers' LlamaForCausalLM"
        )
    if dtype is None:
        dtype = "bfloat16" if saved.get("precision") == "bf16" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    tokenizer = _checkpoint_tokenizer(ckpt)
    if tokenizer is None:
        log.warning("%s carries no tokenizer (synthetic data?): exporting the model only", ckpt)
    template = ckpt / CHAT_TEMPLATE_FILE  # a fine-tuning run's (data=sft)
    chat = template.read_text(encoding="utf-8") if template.is_file() else None
    write_hf(consolidated_state_dict(ckpt), model, out, dtype, tokenizer, max_shard_size, chat)
    log.info("exported %s -> %s (%s)", ckpt, out, dtype)
    return out


def write_hf(
    state: dict[str, torch.Tensor],
    model: dict[str, Any],
    out: Path,
    dtype: str = "float32",
    tokenizer: Any | None = None,
    max_shard_size: str = "5GB",
    chat_template: str | None = None,
) -> None:
    """Write our model's full `state` (our names) and section `model` as a HF dir `out`,
    with `tokenizer` and its `chat_template` (`tokenizer.apply_chat_template`; generation
    then also stops at the end of a turn).

    Written aside and renamed into place, so `out` is complete or absent.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    hf = _adapter(model)
    fields = model_fields(model)
    config = hf.config(fields, dtype, _special_ids(tokenizer))
    state = hf.to_hf(state, fields)
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
    if chat_template is not None and tokenizer is not None:
        generation["eos_token_id"] = stop_token_ids(tokenizer)
    _write_json(tmp / "generation_config.json", {**generation, "_from_model_config": True})
    if tokenizer is not None:
        write_tokenizer(tokenizer, tmp, int(model.get("max_seq_len", 2048)), chat_template)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_tokenizer(
    tokenizer: Any, out: Path, model_max_length: int, chat_template: str | None = None
) -> None:
    """The tokenizer as transformers' `PreTrainedTokenizerFast` files (with the chat
    template in tokenizer_config.json, where every transformers version reads it)."""
    tokenizer.save(str(out / TOKENIZER_FILE))
    specials = {k: v for k, v in SPECIALS.items() if tokenizer.token_to_id(v) is not None}
    _write_json(out / "special_tokens_map.json", specials)
    chat = {} if chat_template is None else {"chat_template": chat_template}
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            **specials,
            **chat,
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


def _adapter(model: dict[str, Any]) -> HFAdapter:
    hf = family_of(model).hf
    if hf is None:
        raise ValueError(f"{model.get('_target_')} has no Hugging Face counterpart")
    return hf


def load_hf_weights(model: torch.nn.Module, hf_dir: Path, model_cfg: dict[str, Any]) -> None:
    """Copy a HF checkpoint's weights into our `model` (model.init_from).

    Refuses a directory whose config.json has another shape than `model_cfg`, naming each
    differing key. Works on ZeRO-3 models too (each parameter gathered to read it, and this
    rank's slice set), and under expert parallelism (each rank reads its own experts).
    """
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.init_from={hf_dir}: no config.json there")
    theirs = json.loads(config_file.read_text())
    hf, fields = _adapter(model_cfg), model_fields(model_cfg)
    diff = hf.mismatches(theirs, fields)
    if diff:
        raise ValueError(
            f"model.init_from={hf_dir} does not fit the configured model:\n  "
            + "\n  ".join(diff)
            + "\nSet the model.* fields to the checkpoint's shape."
        )
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.init_from={hf_dir}: no *.safetensors weights there")
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    parts = _parts(hf, fields, files, params)
    missing = sorted(set(params) - set(parts))
    if missing:
        raise ValueError(f"model.init_from={hf_dir} lacks weights for {missing[:5]}")
    with contextlib.ExitStack() as stack:  # each file opened once
        opened = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        for target, pieces in parts.items():  # one parameter and one HF tensor at a time
            try:
                _set_param(params[target], pieces, opened)
            except ValueError as e:
                raise ValueError(f"model.init_from={hf_dir}: {target}: {e}") from None
    log.info("initialised the model from %s (%d tensors)", hf_dir,
             sum(len(p) for p in parts.values()))  # fmt: skip


def _parts(
    hf: Any, fields: dict[str, Any], files: list[Path], params: dict[str, torch.nn.Parameter]
) -> dict[str, list[tuple[str, Path, tuple[int | slice, ...]]]]:  # fmt: skip
    """Each parameter's parts (HF tensor, file, index), so each is set once; an expert
    parameter of expert parallelism takes its rank's experts alone, at their local index."""
    from safetensors import safe_open

    from pretrain.engine.expert_groups import local_experts

    held = {name: local_experts(p) for name, p in params.items()}
    parts: dict[str, list[tuple[str, Path, tuple[int | slice, ...]]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as weights:
            for hf_name in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                for target, index in hf.our_parts(hf_name, fields):
                    if target not in params:
                        continue
                    experts = held[target]
                    if experts is not None:  # index (e, ...): global expert e
                        if index[0] not in experts:
                            continue
                        index = (index[0] - experts.start, *index[1:])
                    parts.setdefault(target, []).append((hf_name, f, index))
    return parts


def _set_param(
    param: torch.nn.Parameter, pieces: list[tuple[str, Path, tuple[int | slice, ...]]],
    opened: dict[Path, Any],
) -> None:  # fmt: skip
    """Set a parameter from its HF tensors (name, file, the index of the part each sets). A
    vocabulary table may have fewer rows than ours (model.vocab_multiple's padding keeps its
    init); parts must cover the whole parameter (e.g. every expert of a fused tensor).

    Under ZeRO-3 the parameter is gathered to read its init, and each rank sets its own
    slice (`ds_tensor`) from the whole: no broadcast, which would go from global rank 0,
    outside an expert-data group that lacks it."""
    import deepspeed

    shape = tuple(getattr(param, "ds_shape", param.shape))
    with deepspeed.zero.GatheredParameters([param]), torch.no_grad():
        whole = param.detach().to("cpu", copy=True).view(shape)
    covered = 0
    for hf_name, file, index in pieces:
        value = opened[file].get_tensor(hf_name)
        covered += value.numel() if index else math.prod(shape)
        part = whole[index] if index else whole
        want = tuple(part.shape)
        rows_fit = (not index and value.dim() == 2 and value.shape[1:] == want[1:]
                    and value.shape[0] <= want[0])  # fmt: skip
        if tuple(value.shape) != want and not rows_fit:
            raise ValueError(f"{hf_name} has shape {tuple(value.shape)} where the model "
                             f"has {want}")  # fmt: skip
        part[: value.shape[0]].copy_(value.to(whole.dtype))
    if covered != math.prod(shape):
        raise ValueError(f"its {len(pieces)} tensors there ({pieces[0][0]}, ...) set "
                         f"{covered:,} of its {math.prod(shape):,} values: the directory lacks "
                         "some (an expert's projection?)")  # fmt: skip
    _store(param, whole)


@torch.no_grad()
def _store(param: torch.nn.Parameter, whole: torch.Tensor) -> None:
    """Set `param` to `whole`: under ZeRO-3 this rank's (padded) slice of it."""
    if not hasattr(param, "ds_tensor"):
        param.copy_(whole)
        return
    part = param.ds_tensor
    n, rank = part.numel(), param.ds_zero_partition_rank
    mine = whole.flatten()[rank * n : (rank + 1) * n]
    part[: mine.numel()].copy_(mine)
