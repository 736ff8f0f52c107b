"""Reports from records: the leaderboard (Markdown, HTML, CSV), its statistics, published
reference figures, the ablation table and the Weights & Biases report."""
