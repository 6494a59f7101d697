"""The vault: its files reached beneath one directory fd, its search index and its watcher."""
