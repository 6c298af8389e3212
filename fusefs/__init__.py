"""fusefs: a userspace filesystem with its own page cache kept consistent by the
pagecache add lock, genradix-backed extent maps, and dynamic fault injection."""

__version__ = "0.1.0"
