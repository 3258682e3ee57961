"""data=sft in-process: the chat template's assistant spans, the windows (packing, labels,
documents, counts), the stream's independence of the layout, and the errors at start.

With the byte tokenizer every character is a token, so what each window must hold is
counted by hand from the texts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import tokenizer as tokenizers
from pretrain.data.chat import DEFAULT_TEMPLATE, ChatRenderer, with_template_tokens
from pretrain.data.chat_demo import conversations as demo_conversations
from pretrain.data.sft import sft_source
from pretrain.data.source import DataContext, DataSource
from pretrain.data.stream import DataError
from pretrain.model.loss import IGNORE_INDEX

SEQ = 160
CTX = DataContext(300, SEQ, micro_batch_size=2, grad_accum=2, seed=3, documents=True)


def chats(n: int, seed: int = 0) -> list[dict]:
    """`n` conversations of 1-2 exchanges, some with a system message, some as
    prompt/completion records."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = lambda k: " ".join("".join(rng.choice(list("abcdefgh"), 4)) for _ in range(k))  # noqa: E731
        if i % 5 == 4:
            out.append({"prompt": words(2), "completion": words(1)})
            continue
        messages = [{"role": "system", "content": "be terse"}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            messages += [
                {"role": "user", "content": words(int(rng.integers(1, 4)))},
                {"role": "assistant", "content": words(int(rng.integers(1, 3)))},
            ]
        out.append({"messages": messages})
    return out


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def source(path: Path, ctx: DataContext = CTX, **kw):
    return sft_source(ctx, str(path), tokenizer="bytes", val_fraction=0.0,
                      cache_dir=str(path.parent / "cache"), **kw)  # fmt: skip


def assistant_tokens(record: dict) -> int:
    """Byte tokens of the assistant's turns: each reply, <|im_end|> and the newline."""
    messages = record.get("messages") or [{"role": "assistant", "content": record["completion"]}]
    return sum(len(m["content"].encode()) + 2 for m in messages if m["role"] == "assistant")


def test_the_template_marks_the_assistants_turns_and_nothing_else():
    tok = tokenizers.byte_tokenizer()
    assert with_template_tokens(tok, DEFAULT_TEMPLATE) == ["<|im_start|>", "<|im_end|>"]
    renderer = ChatRenderer(tok, DEFAULT_TEMPLATE)
    messages = [{"role": "system", "content": "sé"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hé llo"}, {"role": "user", "content": "x"},
                {"role": "assistant", "content": "bye"}]  # fmt: skip
    r = renderer.render(messages)
    learned = [i for i, keep in zip(r.ids, r.learn, strict=True) if keep]
    assert tok.decode(learned, skip_special_tokens=False) == "hé llo<|im_end|>\nbye<|im_end|>\n"
    assert tok.decode(r.ids, skip_special_tokens=False) == renderer.text(messages)
    prompt = renderer.prompt_ids(messages[:2])
    assert r.ids[: len(prompt)] == prompt  # the generation prompt is where the reply begins


def test_windows_pack_conversations_as_documents_and_learn_only_the_replies(tmp_path):
    records = chats(40)
    data = source(write(tmp_path / "c.jsonl", records))
    assert data.data.truncated == 0
    assert data.pack and data.chat_template == DEFAULT_TEMPLATE
    seen, total_learned = [], 0
    for g in range(data.windows_per_epoch()):
        tokens, labels, docs = data.window_arrays(g)
        members = data._members(g)
        seen += members
        used = sum(len(data.data.ids[i]) for i in members)  # the rest is padding, its own
        assert docs[0] == 0 and (np.diff(docs) >= 0).all()
        assert docs.max() == len(members) - (used >= SEQ)
        learned, ignored = data.counts(g)
        assert learned == sum(assistant_tokens(records[i]) for i in members)
        assert (labels != IGNORE_INDEX).sum() == learned and learned + ignored == SEQ
        kept = labels != IGNORE_INDEX
        assert (labels[kept] == tokens[1:][kept]).all()
        total_learned += learned
    assert sorted(seen) == list(range(40))  # each conversation once per epoch
    one = source(write(tmp_path / "c.jsonl", records), replace(CTX, documents=False))
    assert not one.pack and one.windows_per_epoch() == 40
    assert sum(one.counts(g)[0] for g in range(40)) == total_learned


def test_the_metrics_count_the_global_batch_and_every_layout_reads_the_same_windows(tmp_path):
    path = write(tmp_path / "c.jsonl", chats(30))
    one = source(path, replace(CTX, grad_accum=4, data_size=1))
    batches = [next(one) for _ in range(8)]  # two steps of 4 x 2 windows
    metrics = one.metrics()
    # Each micro-batch weighs its share of the step's counted targets (mean weight 1), so
    # the step's loss is the mean over those targets, not over the micro-batches.
    for step in (batches[:4], batches[4:]):
        counted = [int((b.labels != IGNORE_INDEX).sum()) for b in step]
        assert [b.weight for b in step] == pytest.approx([4 * n / sum(counted) for n in counted])
        assert len(set(counted)) > 1  # uneven: the weights matter
    rows = torch.cat([b.labels for b in batches[4:]])
    assert metrics["data_loss_tokens"] == (rows != IGNORE_INDEX).sum().item()
    assert metrics["data_ignored_tokens"] == (rows == IGNORE_INDEX).sum().item()
    # Two ranks, two micro-batches each: the same step holds the same windows.
    ranks = [source(path, replace(CTX, data_rank=r, data_size=2)) for r in range(2)]
    two = [next(ranks[r]) for _ in range(2) for r in range(2)]
    step2 = [next(ranks[r]) for r in range(2) for _ in range(2)]
    rows = lambda bs: sorted(map(tuple, torch.cat([b.tokens for b in bs]).tolist()))  # noqa: E731
    assert rows([*two, *step2]) == rows(batches)  # the same windows, whole
    assert ranks[0].metrics() == metrics  # the global batch's counts, from any rank
    # The same micro-batches (2 ranks x 2 = 1 rank x 4 per step) weigh the same.
    by_window = {tuple(b.tokens[0].tolist()): b.weight for b in two}
    assert all(by_window[tuple(b.tokens[0].tolist())] == pytest.approx(b.weight)
               for b in batches[:4])  # fmt: skip
    # Resumed on another layout after step 1: the second step exactly.
    again = source(path, replace(CTX, grad_accum=4))
    again.load_resharded_state([r.state_dict() for r in ranks], step=1)
    assert all(torch.equal(next(again).tokens, b.tokens) for b in batches[4:])


def test_epochs_reshuffle_and_a_stream_resumes_where_it_was(tmp_path):
    path = write(tmp_path / "c.jsonl", chats(12))
    data = source(path)
    n = data.windows_per_epoch()
    assert [sorted(data.epoch_windows(e)[0]) for e in range(2)] != [
        sorted(data.epoch_windows(0)[0])] * 2  # fmt: skip
    for _ in range(n):  # past an epoch's end
        next(data)
    state = data.state_dict()
    ahead = [next(data).tokens for _ in range(3)]
    resumed = source(path)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed).tokens, t) for t in ahead)


def test_the_val_split_is_held_out_by_content_and_read_in_file_order(tmp_path):
    path = write(tmp_path / "c.jsonl", chats(200))
    train = sft_source(CTX, str(path), tokenizer="bytes", val_fraction=0.2,
                       cache_dir=str(tmp_path))  # fmt: skip
    val = sft_source(replace(CTX, split="val"), str(path), tokenizer="bytes", val_fraction=0.2,
                     cache_dir=str(tmp_path))  # fmt: skip
    assert len(train.data) + len(val.data) == 200 and 20 < len(val.data) < 60
    order = [i for w in val.epoch_windows(0) for i in w]
    assert order == sorted(order) == list(range(len(val.data)))  # in file order
    # Read once: past its end, empty windows that count nothing (an evaluation asking for
    # more scores each conversation once).
    n = val.windows_per_epoch()
    assert sum(val.counts(g)[0] for g in range(n)) > 0
    assert [val.counts(g) for g in range(n, n + 3)] == [(0, SEQ)] * 3
    assert (val.window_arrays(n)[1] == IGNORE_INDEX).all()
    assert not set(map(bytes, val.data.ids)) & set(map(bytes, train.data.ids))
    assert isinstance(train, DataSource)


def test_bad_input_is_named_before_training(tmp_path):
    lone = {"messages": [{"role": "user", "content": "x"}]}
    bad = write(tmp_path / "bad.jsonl", [*chats(3), lone, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:4: no assistant message.*on_bad_record=skip"):
        source(bad)
    assert len(source(bad, on_bad_record="skip").data) == 3
    with pytest.raises(DataError, match=r"needs a tokenizer: set model.init_from"):
        sft_source(CTX, str(bad), val_fraction=0.0)
    with pytest.raises(
        DataError,
        match=r"261 tokens \(with the chat template's special tokens "
        r"<\|im_start\|>, <\|im_end\|>.*model.vocab_size=259",
    ):
        source(bad, replace(CTX, vocab_size=259), on_bad_record="skip")
    with pytest.raises(DataError, match=r"data.pack=true .* model.document_mask=true"):
        source(bad, replace(CTX, documents=False), pack=True, on_bad_record="skip")
    with pytest.raises(DataError, match=r"val_fraction=0.0 holds out none of the 3"):
        source(bad, replace(CTX, split="val"), on_bad_record="skip")
    opens = {"messages": [{"role": "assistant", "content": "hi"}]}
    with pytest.raises(DataError, match=r"odd.jsonl:1: it opens with the assistant"):
        source(write(tmp_path / "odd.jsonl", [opens]))
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"binary.jsonl cannot be read \(UnicodeDecodeError"):
        source(tmp_path / "binary.jsonl")
    # A template that refuses a record (roles must alternate) names it, or skips it.
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                      "{{ raise_exception('no system messages') }}{% endif %}"
                      "{{ m['content'] }}{% endfor %}")  # fmt: skip
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template cannot render it "
                                        r"\(no system messages"):  # fmt: skip
        source(write(tmp_path / "c.jsonl", chats(6)), chat_template=str(strict))
    kept = source(tmp_path / "c.jsonl", chat_template=str(strict), on_bad_record="skip")
    assert len(kept.data) == 4  # conversations 0 and 3 open with a system message


def test_the_demo_set_is_made_here_and_fits_the_window(tmp_path):
    records = demo_conversations()
    assert len(records) > 300 and records == demo_conversations()
    data = sft_source(replace(CTX, seq_len=255), "demo", tokenizer="bytes",
                      cache_dir=str(tmp_path))  # fmt: skip
    assert (tmp_path / "demo" / "conversations.jsonl").is_file()
    assert data.data.truncated < len(data.data) // 100  # in bytes; the demo's BPE: none


def test_parquet_conversations_and_a_tokenizer_directorys_own_template(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [r for r in chats(20) if "messages" in r]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    # A tokenizer directory with a template of its own tokens: nothing is added.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tokenizers.byte_tokenizer().save(str(tok_dir / "tokenizer.json"))
    own = (
        "{% for m in messages %}{{ '<|bos|>' + m['role'] + ': ' + m['content'] + '<|eos|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|bos|>assistant: ' }}{% endif %}"
    )
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}))
    ctx = replace(CTX, vocab_size=259, init_from=str(tok_dir))  # no room for ChatML's tokens
    data = sft_source(ctx, str(tmp_path / "c.parquet"), val_fraction=0.0)
    assert data.chat_template == own and data.tokenizer == str(tok_dir / "tokenizer.json")
    learned = sum(data.counts(g)[0] for g in range(data.windows_per_epoch()))
    # Each reply and its <|eos|>: the template's own end of turn.
    replies = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert learned == sum(len(c) + 1 for c in replies)


def test_rendered_conversations_are_read_back_from_the_cache(tmp_path, monkeypatch):
    import pretrain.data.sft as sft

    path = write(tmp_path / "c.jsonl", chats(30))
    first = source(path)
    assert len(list((tmp_path / "cache").glob("rendered-*.npz"))) == 1
    monkeypatch.setattr(sft, "_LOADED", {})  # another process: only the file is left
    monkeypatch.setattr(sft, "_render_split", lambda *a: pytest.fail("rendered again"))
    again = source(path)
    assert [x.tolist() for x in again.data.ids] == [x.tolist() for x in first.data.ids]
    assert [x.tolist() for x in again.data.learn] == [x.tolist() for x in first.data.learn]
    write(path, chats(31))  # the file changed: rendered anew
    monkeypatch.undo()
    assert len(source(path).data) == 31


def test_a_val_file_of_its_own_and_compressed_conversations(tmp_path):
    import gzip

    records = chats(20)
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    held = write(tmp_path / "held.jsonl", chats(5, seed=1))
    kw = {"tokenizer": "bytes", "val_path": str(held), "cache_dir": str(tmp_path / "cache")}
    train = sft_source(CTX, str(path), **kw)
    val = sft_source(replace(CTX, split="val"), str(path), **kw)
    assert len(train.data) == 20 and len(val.data) == 5  # all of data.path trains
    learned = sum(val.counts(g)[0] for g in range(val.windows_per_epoch()))
    assert learned == sum(assistant_tokens(r) for r in chats(5, seed=1))
