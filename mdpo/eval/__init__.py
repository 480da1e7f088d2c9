"""Hallucination evaluation: generation with any trained model (`generate`, shared over processes),
object-hallucination metrics (`chair`: CHAIR_i, CHAIR_s, recall, ...), the field's benchmarks (`pope`,
`amber`, scored as their own scripts), answers files from elsewhere (`answers`), and the commands that
run them side by side (`hallucination`: `mdpo-eval hallucination`; `suite`: `mdpo-eval pope / amber / suite`)."""
