"""Application-assisted checkpoints: the program saves its own state through hpcckpt.

``Checkpointer`` (checkpointer.py) is the API; ``state`` encodes what it
saves, ``coord`` is the MPI adapter, ``shards`` the two-phase commit of one
shard per rank, and ``files_engine`` runs ``hpcckpt run --engine app`` for
programs that write their own restart files.
"""
