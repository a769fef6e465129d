"""Speed: the passes that rewrite the model for speed (registered in optimize.PASSES), and
torch.compile with its eager fallback."""
