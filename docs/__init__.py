"""Documentation assets; ``python -m docs.screenshots`` regenerates the screenshots."""
