"""The HTTP layer: ASGI middleware (`zae_limiter.http.asgi`), the FastAPI dependency
(`zae_limiter.http.fastapi`, the `[fastapi]` extra) and the RateLimit header fields and problem
bodies (`zae_limiter.http.fields`). Each is imported by its own name so that the FastAPI module is
loaded only by those who use it; `zae_limiter.asgi`, `.fastapi` and `.ratelimit_fields` are the
same modules under their earlier names."""
