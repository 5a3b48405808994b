"""The OpenAI-compatible HTTP front door of the planner (docs/HTTP_API.md): request parsing
(`openai_schema`), SLO defaults (`api_config`), text in and out (`tokenizer`, `output_text`), the
aiohttp server (`server`), its Prometheus metrics (`http_metrics`) and a benchmark client
(`bench_client`)."""
