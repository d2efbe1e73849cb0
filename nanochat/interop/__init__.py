"""Interop with the Hugging Face ecosystem: transformers' ``NanoChatForCausalLM`` format both ways.

- :mod:`nanochat.interop.hf_format`: the key map, config map and errors shared by both directions.
- :mod:`nanochat.interop.hf_tokenizer`: our BPE tokenizer as a ``tokenizers`` ``tokenizer.json`` (and
  back) plus the chat template that renders nanochat's conversation format.
- :mod:`nanochat.interop.hf_export`: ``nanochat export hf`` (checkpoint → transformers directory).
- :mod:`nanochat.interop.hf_import`: ``nanochat checkpoint import-hf`` (transformers directory or hub
  repo → checkpoint).

Only the ``hf`` extra (``tokenizers``, ``huggingface_hub``) is needed, never ``transformers``; nothing
here is imported to train or serve. See docs/interop.md.
"""
