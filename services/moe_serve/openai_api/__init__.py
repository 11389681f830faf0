"""The OpenAI-compatible HTTP front end (`moe-openai`): a separate process speaking gRPC to the gateway."""
