"""The FUSE face: maps the namespace onto kernel objects. Only this layer imports pyfuse3."""
