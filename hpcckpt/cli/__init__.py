"""The command-line interface: one small module per subcommand.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a function ``(args) -> int``. Modules only parse and call the core.
"""
