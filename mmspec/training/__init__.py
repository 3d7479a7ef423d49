"""Training recipes: drafters (EAGLE-style heads) and the reference models."""
