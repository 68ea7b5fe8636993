"""AI Pipe: a self-hosted LLM API gateway with per-user tokens, budgets and cost tracking."""

__version__ = "0.1.0"
