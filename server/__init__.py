"""ChatMed Serve's HTTP side: an OpenAI-compatible FastAPI app over engine.AsyncEngine."""
