"""Row formats, templates, loss masks and packing (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayft.training.formats import (
    IGNORE_INDEX,
    Renderer,
    RowError,
    TemplateError,
    collate,
    normalize,
    pack_examples,
    tokenize_rendered,
)


def encode(tok, doc, template=None, train_on_inputs=False):
    text, spans = Renderer(tok, template, train_on_inputs).render(doc)
    ((ids, labels),) = tokenize_rendered(tok, [text], [spans])
    return text, ids, labels


def trained_runs(tok, ids, labels) -> list[str]:
    """Decoded text of each contiguous run of trained tokens."""
    runs, cur = [], []
    for tid, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if lab != IGNORE_INDEX:
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


# ---------------------------------------------------------------- formats and validation


@pytest.mark.parametrize(
    "row, kind",
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
        ({"instruction": "Add", "input": "2+2", "output": "4"}, "chat"),
        ({"prompt": "Q:", "completion": " A"}, "segments"),
        ({"text": "some text"}, "segments"),
    ],
)
def test_formats_are_detected(row, kind):
    assert normalize(row)["kind"] == kind


def test_alpaca_joins_instruction_and_input():
    doc = normalize({"instruction": "Add these", "input": "2+2", "output": "4"})
    assert doc["messages"] == [{"role": "user", "content": "Add these\n\n2+2"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "messages[1].'content' is empty",
        ),
        (
            {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "messages[0].role is 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            "must be a string (got int)",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            "missing field messages[0].'content'",
        ),
        ({"messages": "hello"}, "non-empty list"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]},
            "weight must be 0 or 1",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
            "every assistant message has weight 0",
        ),
        ({"instruction": "x", "output": 5}, "'output' must be a string"),
        ({"question": "x", "answer": "y"}, "cannot tell the format"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_rows_say_what_is_wrong(row, message):
    with pytest.raises(RowError, match=None) as info:
        normalize(row)
    assert message in str(info.value)


def test_named_format_is_enforced():
    with pytest.raises(RowError, match="missing field 'completion'"):
        normalize({"prompt": "x", "text": "y"}, "prompt_completion")


# ---------------------------------------------------------------- masking


def test_only_assistant_replies_and_their_end_of_turn_are_trained(smol_tokenizer):
    tok = smol_tokenizer
    doc = normalize(
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "It is 6."},
            ]
        }
    )
    _, ids, labels = encode(tok, doc)
    assert trained_runs(tok, ids, labels) == ["4<|im_end|>", "It is 6.<|im_end|>"]


def test_weight_zero_turns_are_masked(smol_tokenizer):
    doc = normalize(
        {
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "bad answer", "weight": 0},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "good answer", "weight": 1},
            ]
        }
    )
    _, ids, labels = encode(smol_tokenizer, doc)
    assert trained_runs(smol_tokenizer, ids, labels) == ["good answer<|im_end|>"]


def test_reply_that_repeats_the_question_is_located_in_the_assistant_turn(smol_tokenizer):
    doc = normalize({"messages": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]})
    text, ids, labels = encode(smol_tokenizer, doc)
    assert trained_runs(smol_tokenizer, ids, labels) == ["yes<|im_end|>"]
    first_trained = int(np.argmax(labels != IGNORE_INDEX))
    assert smol_tokenizer.decode(ids[:first_trained]).endswith("<|im_start|>assistant\n")


def test_train_on_inputs_trains_everything_but_the_first_token(smol_tokenizer):
    _, ids, labels = encode(
        smol_tokenizer,
        normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        train_on_inputs=True,
    )
    assert labels[0] == IGNORE_INDEX and (labels[1:] == ids[1:]).all()


def test_alpaca_template(smol_tokenizer):
    text, ids, labels = encode(
        smol_tokenizer, normalize({"instruction": "Add", "input": "2+2", "output": "4"}), template="alpaca"
    )
    assert "### Instruction:\nAdd\n\n2+2" in text and "### Response:\n4" in text
    assert trained_runs(smol_tokenizer, ids, labels) == ["4" + smol_tokenizer.eos_token]


def test_custom_jinja_template(smol_tokenizer):
    tpl = (
        "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>>{% endif %}"
    )
    doc = normalize({"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]})
    text, ids, labels = encode(smol_tokenizer, doc, template=tpl)
    assert text == "<<user>> ping<|im_end|>\n<<assistant>> pong<|im_end|>\n"
    # What the model writes after the generation prompt, through the end-of-turn token: " pong" is one BPE token
    # that starts on the separator, trained as a whole.
    assert trained_runs(smol_tokenizer, ids, labels) == [" pong<|im_end|>"]


def test_template_without_generation_prompt_trains_the_header(smol_tokenizer):
    # A template that writes no generation prompt: the endpoint's prompt ends after the user turn, so the model
    # itself must write the assistant header, and that is what it is trained on (train = serve).
    tpl = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    doc = normalize({"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]})
    text, ids, labels = encode(smol_tokenizer, doc, template=tpl)
    assert trained_runs(smol_tokenizer, ids, labels) == ["<<assistant>> pong<|im_end|>"]


def test_prompt_completion_and_text(smol_tokenizer):
    _, ids, labels = encode(smol_tokenizer, normalize({"prompt": "The sky is", "completion": " blue."}))
    assert trained_runs(smol_tokenizer, ids, labels) == [" blue.<|im_end|>"]
    _, ids, labels = encode(smol_tokenizer, normalize({"text": "Once upon a time."}))
    # Continued pretraining: loss on every token (the first is never predicted) plus the end token.
    assert (labels[1:] == ids[1:]).all() and smol_tokenizer.decode(ids).endswith("<|im_end|>")


def test_model_without_chat_template_needs_a_template(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    renderer = Renderer(tok, None)
    with pytest.raises(TemplateError, match="data.template"):
        renderer.render(
            normalize({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        )
    text, _ = renderer.render(normalize({"text": "plain text needs no template"}))
    assert text.startswith("plain text")


# ---------------------------------------------------------------- packing and batching


def test_packing_fits_rows_and_restarts_positions():
    rng = np.random.default_rng(0)
    examples = [
        (rng.integers(3, 100, n).astype(np.int32), rng.integers(3, 100, n).astype(np.int32))
        for n in rng.integers(5, 60, 200)
    ]
    rows = pack_examples(examples, 128)
    assert sum(r["num_examples"] for r in rows) == 200
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    total = sum(len(e[0]) for e in examples)
    assert total / (len(rows) * 128) > 0.9  # first-fit-decreasing packs tightly
    for r in rows:
        starts = np.flatnonzero(r["position_ids"] == 0)
        assert len(starts) == r["num_examples"]
        assert (np.diff(r["position_ids"])[np.diff(r["position_ids"]) != 1] < 0).all()


def test_collate_pads_to_a_multiple_of_8():
    rows = [{"input_ids": np.arange(5), "labels": np.arange(5)}, {"input_ids": np.arange(11), "labels": np.arange(11)}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 16
    assert (batch["labels"][0, 5:] == IGNORE_INDEX).all()


def test_packed_row_gives_each_example_the_loss_it_has_alone(smol_tokenizer, tiny_model_dir):
    """The promise of packing: attention never crosses examples, so per-example losses are unchanged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    docs = [
        normalize(
            {
                "messages": [
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                ]
            }
        ),
        normalize({"instruction": "Reverse the word", "input": "stressed", "output": "desserts"}),
        normalize({"text": "A stream of plain text for continued pretraining."}),
    ]
    renderer = Renderer(smol_tokenizer, None)
    rendered = [renderer.render(d) for d in docs]
    examples = tokenize_rendered(smol_tokenizer, [t for t, _ in rendered], [s for _, s in rendered])

    def per_token_loss(batch):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return loss, shift_labels != IGNORE_INDEX

    alone = []
    for ids, labels in examples:
        loss, mask = per_token_loss(collate([{"input_ids": ids, "labels": labels}], smol_tokenizer.pad_token_id))
        alone.append(loss[mask].mean())

    (row,) = pack_examples(examples, 1024)
    assert row["num_examples"] == 3
    loss, mask = per_token_loss(collate([row], smol_tokenizer.pad_token_id))
    packed = []
    offset = 0
    for ids, _ in examples:
        n = len(ids)
        seg = slice(offset, offset + n - 1)  # the shifted losses of this example's positions
        packed.append(loss[0, seg][mask[0, seg]].mean())
        offset += n
    torch.testing.assert_close(torch.stack(packed), torch.stack(alone), rtol=1e-4, atol=1e-4)

    # And a naive concatenation (no position restart) would NOT match: the test can fail.
    naive = collate([{"input_ids": row["input_ids"], "labels": row["labels"]}], smol_tokenizer.pad_token_id)
    loss_naive, _ = per_token_loss(naive)
    n0 = len(examples[0][0])
    second = loss_naive[0, n0 : n0 + len(examples[1][0]) - 1][mask[0, n0 : n0 + len(examples[1][0]) - 1]].mean()
    assert not torch.allclose(second, alone[1], rtol=1e-4, atol=1e-4)
