"""The model: GPT-2 (gpt), its tokenizer, sampling (generate), hand-written LoRA, loading weights and exporting them.
Imports formats and the shared leaves."""
