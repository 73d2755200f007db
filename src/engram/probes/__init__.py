"""Looking inside a trained model: Engram gates per token, probes with the memory zeroed, the logit lens
and layer CKA, hash-table collisions on the corpus, and RULER-style retrieval tasks.

Everything reads a model through forward hooks; no probe edits a model's weights or code.
"""
