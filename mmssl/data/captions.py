"""Vocabulary of the built-in coloured-digits demo: colours, digit names, caption templates.

These strings are part of the corpus of the shipped default tokenizer, so changing them
changes `tokenizer/` (see tokenizer/README.md).  Templates name the digit only, the colour
only, or both: with every caption naming both, a CLIP model learns colour long before
digits, because colour is the easier half of each caption.
"""

from __future__ import annotations

# Hue in degrees for each tint; eight well-separated hues on the colour circle.
COLORS: dict[str, float] = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 225.0,
    "purple": 275.0,
    "pink": 320.0,
}

DIGITS: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Fields: {digit} (word), {numeral} ("7"), {color}.
DIGIT_TEMPLATES: list[str] = [
    "a photo of the digit {digit}.",
    "a handwritten {digit}.",
    "the number {numeral}.",
    "a picture of a {digit}.",
    "a drawing of the digit {numeral}.",
]
COLOR_TEMPLATES: list[str] = [
    "something {color}.",
    "a {color} image.",
    "a drawing in {color} ink.",
    "a picture that is {color}.",
]
BOTH_TEMPLATES: list[str] = [
    "a {color} {digit}.",
    "the digit {digit} in {color}.",
    "a {color} handwritten {numeral}.",
    "a photo of a {color} number {digit}.",
    "a {digit} drawn in {color}.",
]
CAPTION_TEMPLATES: list[str] = DIGIT_TEMPLATES + COLOR_TEMPLATES + BOTH_TEMPLATES


def render_caption(template: str, digit: int, color: str) -> str:
    """Fill one template for a digit (0-9) and a colour name."""
    return template.format(digit=DIGITS[digit], numeral=str(digit), color=color)


def caption_corpus() -> list[str]:
    """Every caption the demo can produce, in a fixed order (a tokenizer corpus)."""
    return [render_caption(t, d, c) for t in CAPTION_TEMPLATES for d in range(10) for c in COLORS]


def class_prompts(field: str) -> tuple[list[str], list[list[str]]]:
    """The demo's zero-shot classes of `field`, "digit" or "color": the class names and, per
    class, its prompts (that field's templates filled in; `mmssl eval zeroshot --classes
    digit` and the demo's class files)."""
    if field == "digit":
        return list(DIGITS), [
            [render_caption(t, d, "") for t in DIGIT_TEMPLATES] for d in range(10)
        ]
    if field == "color":
        return list(COLORS), [[render_caption(t, 0, c) for t in COLOR_TEMPLATES] for c in COLORS]
    raise ValueError(f"field must be 'digit' or 'color', got {field!r}")
