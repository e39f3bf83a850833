"""containerd configuration, pure: parsing, editing and the line scanner (no I/O)."""
