"""Drop-in memories for agent frameworks: :mod:`.langchain` and :mod:`.openai_agents` (each needs its extra)."""

__all__: list[str] = []
