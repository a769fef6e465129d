"""Text: prompts -> conditioning (A1111 weights, BREAK, long prompts), textual-inversion
embeddings, a model's vocabulary."""
