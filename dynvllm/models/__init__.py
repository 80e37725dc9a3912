"""Model helpers: the tiny test models and fetching models from the Hugging Face hub."""
