"""Draft models for speculative decoding: built from the target, distilled, saved as plain
HF model folders (usable as `assistant_model=` in transformers)."""
