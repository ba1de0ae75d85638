"""The data: IMDB reviews, prompts and their lengths, the sentiment classifier that labels completions, preference
pairs (built and cached) and their batches. Imports model, formats and the shared leaves."""
