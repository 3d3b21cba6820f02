"""Pieces the recipes share: checkpoints, logging, optimiser set-up, hidden-state cache."""
