"""The chat app: per-session settings, the shared backend, views, handlers and the page."""
