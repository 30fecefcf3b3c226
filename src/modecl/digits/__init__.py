"""The embedded default: a tiny unified multimodal model on scikit-learn's real digits."""
