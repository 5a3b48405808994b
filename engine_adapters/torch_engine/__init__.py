"""The PyTorch engine: a Llama decoder with a paged KV cache executing plan steps exactly
(ragged mixed chunked-prefill/decode batches, speculative decoding with a draft model).

Importing this package imports torch; the planner side never imports it.
"""
