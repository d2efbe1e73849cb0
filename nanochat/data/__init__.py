"""Ray Data: training rows built from the sources (pretraining shards) and the tasks (conversations).

``pipeline`` (pretraining stream), ``chat_data`` (mid-training / SFT), ``packing`` (the pure
best-fit packers), ``idle_backoff`` (Ray Data scheduling-loop fix). Raw text and conversation
sources live below, in :mod:`nanochat.sources`.
"""
