"""The HTTP service: OpenAI moderation, LiteLLM guardrail and guarded chat completions, with admission control."""
