"""Filesystem steps that are safe as root in directories users control."""
