"""The languages a captioned data set can speak: its `language=` option (as `shapes`')."""

from __future__ import annotations

from .shapes import LANGUAGES, check_language

__all__ = ["LANGUAGES", "caption_languages"]


def caption_languages(language: str, data: str) -> tuple[str, ...]:
    """The caption languages of `language=` ("both": English and Spanish, in that order);
    anything else is a ValueError naming the data set."""
    try:
        check_language(language)
    except ValueError as e:
        raise ValueError(f"{data}: {e}") from None
    return ("en", "es") if language == "both" else (language,)
