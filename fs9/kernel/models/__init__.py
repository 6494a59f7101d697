"""Models as devices: configuration, conversations, budgets and the call scheduler."""
