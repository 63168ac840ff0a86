"""The languages a captioned data set can speak: its `language=` option."""

from __future__ import annotations

LANGUAGES = ("en", "es", "both")


def caption_languages(language: str, data: str) -> tuple[str, ...]:
    """The caption languages of `language=` ("both": English and Spanish, in that order);
    anything else is a ValueError naming the data set."""
    if language not in LANGUAGES:
        raise ValueError(
            f"{data}: language must be one of {', '.join(LANGUAGES)}, got {language!r}"
        )
    return ("en", "es") if language == "both" else (language,)
