"""Text: prompts -> conditioning (A1111 weights, BREAK, long prompts), the CLIP tokenizer,
textual-inversion embeddings."""
