"""Offline data stages: readers, cleaning, the prompt template, prepare (and pack)."""
