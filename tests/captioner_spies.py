"""Test doubles shared by the captioner tests."""

from __future__ import annotations


class ProcessorSpy:
    """Stands in for a captioner's processor: records the text of each call, delegates everything."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def __call__(self, **kwargs):
        self.texts.append(list(kwargs["text"]))
        return self.inner(**kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)
