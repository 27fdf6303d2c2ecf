"""Chat-template rendering with thinking modes, packing with EOS, tokenizer fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from lutq.assets.corpora import Document
from lutq.core import LutqError
from lutq.data import iter_render, pack, render, render_text, spread, strip_thinking, tokenizer_fingerprint
from lutq.testing import tiny_tokenizer

CHAT = Document(
    id="c",
    messages=[
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."},
    ],
)


def test_thinking_modes_on_qwen3_like_template(tokenizer):
    on = render_text(CHAT, tokenizer, "on")
    off = render_text(CHAT, tokenizer, "off")
    # (the tiny template's whitespace control drops the newline after each <|im_end|>)
    assert on == [
        "<|im_start|>user\nWhat is 2+2?<|im_end|><|im_start|>assistant\n"
        "<think>\nadd them\n</think>\n\nIt is 4.<|im_end|>"
    ]
    assert off == ["<|im_start|>user\nWhat is 2+2?<|im_end|><|im_start|>assistant\nIt is 4.<|im_end|>"]
    assert render_text(CHAT, tokenizer, "both") == off + on
    assert render_text(CHAT, tokenizer, "none") == ["What is 2+2?\n\n<think>\nadd them\n</think>\n\nIt is 4."]
    with pytest.raises(LutqError, match="thinking mode 'maybe'"):
        render_text(CHAT, tokenizer, "maybe")


def test_enable_thinking_reaches_the_template_and_is_optional():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
        "{% if enable_thinking is defined %}think={{ enable_thinking }}{% endif %}"
    )
    off, on = render_text(CHAT, tok, "both")
    assert off == "What is 2+2?|It is 4.|think=False"
    assert on == "What is 2+2?|<think>\nadd them\n</think>\n\nIt is 4.|think=True"
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"  # ignores the flag
    assert render_text(CHAT, tok, "on") == ["[What is 2+2?][<think>\nadd them\n</think>\n\nIt is 4.]"]


def test_plain_text_is_tokenized_as_is_once_in_every_mode(tokenizer):
    doc = Document(id="t", text="<think>kept</think> in plain text")
    for mode in ("off", "on", "both", "none"):
        assert render_text(doc, tokenizer, mode) == [doc.text]
    ids = render([doc], tokenizer, "both")
    assert len(ids) == 1 and tokenizer.decode(ids[0]) == doc.text


def test_chat_needs_a_template_unless_raw(tokenizer):
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(LutqError, match="no chat template"):
        render_text(CHAT, tok, "off")
    assert render_text(CHAT, tok, "none")[0].startswith("What is 2+2?\n\n")


def test_render_tokenizes_special_tokens_without_adding_any(tokenizer):
    ids = render([CHAT, CHAT], tokenizer, "both")
    assert len(ids) == 4
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0][0] == im_start and ids[0].count(im_start) == 2
    assert tokenizer.decode(ids[1]) == render_text(CHAT, tokenizer, "on")[0]
    assert list(iter_render([CHAT] * 5, tokenizer, "off", batch=2)) == render([CHAT] * 5, tokenizer, "off")


def test_strip_thinking():
    assert strip_thinking("a<think>x\ny</think>\n\nb<think></think>c") == "abc"


def test_pack_eos_after_every_document_no_padding():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    blocks = pack(docs, L=4, eos_id=0)
    assert blocks.dtype == np.int32
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 10 0 -> 3 blocks of 4, tail "10 0" dropped
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1]], L=4, eos_id=0).shape == (0, 4)
    with pytest.raises(LutqError, match="L=1"):
        pack(docs, L=1, eos_id=0)


def test_pack_names_the_document_each_block_begins_in():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    block_docs: list[int] = []
    pack(docs, L=4, eos_id=0, block_docs=block_docs)
    # stream: [1 2 3 0] [4 5 0 6] [7 8 9 0]: blocks begin in documents 0, 1 and 2
    assert block_docs == [0, 1, 2]
    rng = np.random.default_rng(0)
    for _ in range(200):  # against a token-by-token owner map, any lengths (empty documents too)
        docs = [list(rng.integers(10, 99, rng.integers(0, 25))) for _ in range(rng.integers(1, 12))]
        L, cap = int(rng.integers(2, 10)), [None, 1, 3, 7][rng.integers(0, 4)]
        block_docs = []
        blocks = pack(docs, L=L, eos_id=1, max_blocks=cap, block_docs=block_docs)
        owner = [i for i, d in enumerate(docs) for _ in range(len(d) + 1)]
        assert block_docs == [owner[b * L] for b in range(len(blocks))]


def test_spread_cuts_blocks_within_each_document():
    docs = [list(range(100, 117)), [1, 2], list(range(200, 208))]  # 18, 3 and 9 tokens with the EOS
    block_docs: list[int] = []
    blocks = spread(docs, L=4, eos_id=0, per_document=2, block_docs=block_docs)
    # document 0 has 4 whole blocks: the centres of its two halves are blocks 1 and 3; document 1 is too short;
    # document 2 has 2 blocks [200..203] [204..207] (its EOS falls in the dropped tail)
    assert blocks.tolist() == [[104, 105, 106, 107], [112, 113, 114, 115], [200, 201, 202, 203], [204, 205, 206, 207]]
    assert block_docs == [0, 0, 2, 2]
    one = spread(docs, L=4, eos_id=0, per_document=1)
    assert one.tolist() == [[108, 109, 110, 111], [204, 205, 206, 207]]  # the middle block of each
    seen = []

    def stream():
        for i in range(100):
            seen.append(i)
            yield [i] * 9

    assert spread(stream(), L=4, eos_id=0, per_document=1, max_blocks=3).shape == (3, 4) and len(seen) == 3
    with pytest.raises(LutqError, match="per_document"):
        spread(docs, L=4, eos_id=0, per_document=0)


def test_renderings_of_one_document_are_one_unit():
    """thinking="both" renders a conversation twice: iter_render's `sources` maps renderings to documents, so
    pack names the conversation, not the rendering, and spread takes at most N blocks per conversation."""
    tok = tiny_tokenizer()
    docs = [
        Document(
            id=f"c{i}",
            messages=[
                {"role": "user", "content": "hi " * 20},
                {"role": "assistant", "content": "<think>hmm</think>ok " * 15},
            ],
        )
        for i in range(3)
    ]
    sources: list[int] = []
    renderings = list(iter_render(docs, tok, "both", batch=2, sources=sources))
    assert len(renderings) == 6 and sources == [0, 0, 1, 1, 2, 2]
    block_docs: list[int] = []
    blocks = pack(renderings, L=16, eos_id=0, block_docs=block_docs, doc_of=sources)
    assert len(blocks) == len(block_docs) and block_docs == sorted(block_docs) and set(block_docs) == {0, 1, 2}
    block_docs = []
    spread(renderings, L=16, eos_id=0, per_document=1, block_docs=block_docs, doc_of=sources)
    assert block_docs == [0, 1, 2]  # one block per conversation, not one per rendering


def test_pack_stops_reading_once_full():
    seen = []

    def stream():
        for i in range(100):
            seen.append(i)
            yield [i] * 5

    blocks = pack(stream(), L=4, eos_id=-1, max_blocks=3)
    assert blocks.shape == (3, 4) and len(seen) == 2  # 12 tokens come from the first two documents
    assert pack(stream(), L=4, eos_id=-1, max_blocks=0).shape == (0, 4)


def test_tokenizer_fingerprint_sees_vocab_specials_and_template():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.chat_template = b.chat_template + " "
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    c = tiny_tokenizer()
    c.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(c)


@pytest.mark.slow
def test_smollm2_template_renders_off_and_on(teacher):
    _, tok = teacher
    doc = Document(id="s", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    off, on = render_text(doc, tok, "both")
    assert off == on  # SmolLM2's template has no thinking; nothing to strip
    assert off.startswith("<|im_start|>system\n") and off.endswith("<|im_start|>assistant\nhello<|im_end|>\n")
    ids = render([doc], tok, "off")[0]
    assert tok.decode(ids) == off and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
