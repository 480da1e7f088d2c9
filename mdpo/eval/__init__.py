"""Hallucination evaluation: generation with any trained model (`generate`) and object-hallucination
metrics (`chair`: CHAIR_i, CHAIR_s, recall, ...), run side by side by `mdpo-eval hallucination`."""
