"""Captions: templated descriptions of the built-in digits, and caption files for user images.

The digits have no captions, so each training example gets one of TRAIN_TEMPLATES (a new draw
every step). PARAPHRASES are never used in training: they measure whether a text-conditional
model understands the prompt or only memorised the templates.
"""
from __future__ import annotations

from pathlib import Path

from .data import DataError
from .errors import read_user_text

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the number {digit}",
    "the digit {word}",
    "the number {digit}, drawn thick",
    "a thin handwritten {word}",
    "{word}",
    "{digit}",
    "a {word} written by hand",
    "an image of the digit {digit}",
    "a scanned {word} in black and white",
    "the numeral {word}",
    "a small picture of a {word}",
    "digit {digit} in pen",
    "someone wrote a {word}",
    "a messy {word}",
    "a neat handwritten number {digit}",
)

PARAPHRASES = (
    "a drawing of the figure {word}",
    "handwriting showing the numeral {digit}",
    "a hand-drawn {digit}",
    "the character {digit} written with a pencil",
    "a photo of a handwritten number {word}",
    "please draw a {word}",
)


def digit_caption(template: str, label: int) -> str:
    return template.format(word=NUMBER_WORDS[label], digit=label)


def digit_captions(templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[list[str]]:
    """captions[label][k]: template k filled in for each digit 0..9."""
    return [[digit_caption(t, label) for t in templates] for label in range(10)]


def read_caption_files(images: list[Path]) -> list[str]:
    """The caption of each image from a text file next to it with the same stem (cat.png -> cat.txt).

    A missing caption file is an error naming the first few, one that is not UTF-8 names itself; an empty file is
    an empty (unconditional) caption."""
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        shown = ", ".join(str(p.with_suffix(".txt")) for p in missing[:3])
        raise DataError(f"{len(missing)} image(s) have no caption file next to them (e.g. {shown}); "
                        "write one .txt per image, with the image's stem")
    return [read_user_text(p.with_suffix(".txt"), DataError).strip() for p in images]
