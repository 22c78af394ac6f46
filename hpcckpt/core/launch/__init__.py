"""Starting a job in its own namespaces: the spawn, its network link and its scratch dirs."""
