"""Packaging for AI Pipe: one import name, `aipipe`, with storage/ and ui/ mapped inside it."""
from setuptools import setup

setup(
    name="aipipe",
    version="0.1.0",
    description="Self-hosted LLM API gateway: per-user tokens, budgets and cost tracking for OpenAI, OpenRouter and Gemini",
    python_requires=">=3.11",
    # storage/ and ui/ live at the top of the repository but install as aipipe.storage and aipipe.ui,
    # so nothing generic named `storage` lands in site-packages.
    packages=["aipipe", "aipipe.providers", "aipipe.handlers", "aipipe.storage", "aipipe.ui"],
    package_dir={"aipipe": "aipipe", "aipipe.storage": "storage", "aipipe.ui": "ui"},
    package_data={
        "aipipe": ["pricing.json"],
        "aipipe.ui": ["templates/*.html", "static/*", "static/**/*"],
    },
    install_requires=[
        "tornado>=6.5",
        "aiohttp>=3.10",  # the client for provider calls (aipipe/upstream.py)
        "pyjwt>=2.8",
        "aiosqlite>=0.20",
        "asyncpg>=0.29",
        "numpy>=1.26",
        "jinja2>=3.1",
        "google-auth>=2.30",
        "orjson>=3.9",
        "python-dotenv>=1.0",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "fast": ["uvloop>=0.19"],
        "test": [
            "pytest>=8",
            "pytest-tornado>=0.8",
            "openai>=1.40",
            "anthropic>=0.40",
            "hypothesis>=6",
            "playwright>=1.45",
            "cryptography>=42",
            "requests>=2.31",
        ],
    },
    entry_points={"console_scripts": ["aipipe = aipipe.cli:main"]},
)
