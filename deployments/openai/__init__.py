"""The OpenAI-compatible ingress, in three parts: routes (FastAPI), protocol (pydantic models), service (logic)."""
