"""Datasets: synthetic captioned scenes (`blipkit.data.scenes`) for offline training and evaluation."""
