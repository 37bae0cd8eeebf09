"""Training data the trainer reads: annotation records (read, validate), the reference and GSM8K
converters, tfds builders, chat encoding, mixtures, packing and the batch iterator.

`data_pipeline` (the `lumos-jax data` command and the LLM-teacher converter) builds on this
package; nothing here imports `data_pipeline`.
"""
