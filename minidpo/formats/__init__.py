"""File formats and downloads: safetensors, TensorFlow checkpoint bundles, resumable HTTP downloads. Imports only the
shared leaves (config, fileio, progress)."""
