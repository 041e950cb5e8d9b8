"""The demo captions name the digit they were drawn for, in the corpus order the shipped
tokenizer was trained on; render_descriptor reports a small blur."""

from __future__ import annotations

from mmssl.data.captions import CAPTION_TEMPLATES, DIGITS, caption_corpus, render_caption
from mmssl.descriptor import DESCRIPTOR_V1, render_descriptor


def test_numeral_and_word_name_the_same_digit():
    for d in range(10):
        assert render_caption("the number {numeral}.", d, "red") == f"the number {d}."
        assert (
            render_caption("a {digit} drawn in {color}.", d, "blue")
            == f"a {DIGITS[d]} drawn in blue."
        )


def test_corpus_is_every_template_digit_colour_in_order():
    corpus = caption_corpus()
    assert len(corpus) == len(CAPTION_TEMPLATES) * 10 * 8
    assert corpus[:3] == ["a photo of the digit zero."] * 3  # colours vary fastest
    assert corpus[8] == "a photo of the digit one."


def test_render_descriptor_reports_a_small_blur():
    v = DESCRIPTOR_V1.neutral_tensor()
    v[0] = 0.3  # sigma 0.3: blur applied
    assert render_descriptor(v) == "blur 0.3"
