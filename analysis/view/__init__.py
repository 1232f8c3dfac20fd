"""`attnscope view`: a local page to explore a trace store's steps, layers, heads and spans."""
