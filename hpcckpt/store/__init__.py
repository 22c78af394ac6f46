"""The image store: where images live (one layout), publishing them, retention and maintenance."""
