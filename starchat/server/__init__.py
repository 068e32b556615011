"""The real-time endpoint: Azure ML scoring, OpenAI and TGI APIs over the engine (`create_app`)."""
