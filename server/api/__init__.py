"""The HTTP APIs, one module (or package) each; every one has `register(app)` and reads the
app's shared state through `server.keys`, never through the app factory."""
