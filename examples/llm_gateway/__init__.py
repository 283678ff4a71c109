"""An OpenAI-shaped LLM gateway rate limited per API key and per project: see README.md."""
