"""The foundation every other layer may import: typed errors, the adapter identity, configuration,
thread helpers and typed stats. It imports nothing of loraserve above it."""
