"""`difusion serve`: OpenAI's images API, AUTOMATIC1111's, a stream of step previews and a
page, over the models the project loads."""

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
