"""Synthetic multi-event video corpus for the quickstart: real mp4 files and the release's annotation formats."""

from .corpus import generate_corpus, main

__all__ = ["generate_corpus", "main"]
